"""bitsandbytes quantization of the in-memory model (int8 LLM.int8, 4-bit nf4/fp4).

The model as the earlier stages left it (pruned, trained) is written to a temporary safetensors
checkpoint and loaded back through transformers' ``BitsAndBytesConfig``, so the result is those weights
quantized, not a fresh load of the original model. Only the linears the resolver selects are quantized
(every other ``nn.Linear``, ``lm_head`` included, is kept in ``llm_int8_skip_modules``). Zeros survive:
int8 rows are scaled by their absolute maximum and 0 maps to code 0; nf4 and fp4 code books contain 0
exactly.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from compress.core.config import choice
from compress.core.errors import ShortfallError, UnsupportedModelError
from compress.quant.base import ModelQuantizer, QuantConfig
from compress.registry import register

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BnbConfig(QuantConfig):
    method: str = "bnb"
    bnb_quant_type: str = "nf4"  # 4-bit: nf4 | fp4
    bnb_double_quant: bool = True  # 4-bit: quantize the block scales too
    bnb_compute_dtype: str = "float32"  # 4-bit: float32 | bfloat16 | float16
    bnb_int8_threshold: float = 6.0  # 8-bit: LLM.int8 outlier threshold

    def validate(self) -> None:
        super().validate()
        choice(self.key("bits"), self.bits, (4, 8))
        choice(self.key("bnb_quant_type"), self.bnb_quant_type, ("nf4", "fp4"))
        choice(self.key("bnb_compute_dtype"), self.bnb_compute_dtype, tuple(COMPUTE_DTYPES))

    def label(self) -> str:
        return f"bnb w{self.bits}" + (f" {self.bnb_quant_type}" if self.bits == 4 else "")

    def bits_per_weight(self) -> float:
        """Storage bits per weight: int8 with one float32 scale per row (counted per row elsewhere: ~8);
        4-bit with a float32 absmax per 64 weights, or with double quantization an 8-bit absmax per 64
        and a float32 per 256 blocks."""
        if self.bits == 8:
            return 8.0
        return 4 + (8 / 64 + 32 / (64 * 256) if self.bnb_double_quant else 32 / 64)


def bnb_config(bits: int, quant_type: str = "nf4", double_quant: bool = True, compute_dtype=torch.float32,
               threshold: float = 6.0, skip: List[str] = ()):
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=list(skip))
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=list(skip))
    raise ValueError(f"bitsandbytes quantizes to 8 or 4 bits, not {bits}")


def skip_modules(model: nn.Module, selected: List[str]) -> List[str]:
    """Every Linear that is not selected (full names), so that bitsandbytes leaves it alone."""
    chosen = set(selected)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]


def bnb_quantize(model: nn.Module, config, device: str = "cpu", dtype=torch.float32) -> nn.Module:
    """A bitsandbytes-quantized copy of ``model``'s current weights (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        q = AutoModelForCausalLM.from_pretrained(d, quantization_config=config, dtype=dtype, device_map={"": device})
    q.eval()
    q.config.use_cache = False
    return q


def is_bnb(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


@register("quant", "bnb", BnbConfig)
class BitsAndBytes(ModelQuantizer):
    """bitsandbytes int8 (LLM.int8) or 4-bit nf4/fp4 on the in-memory model, through transformers' loader"""

    def quantize(self, model: nn.Module, names: List[str], device) -> nn.Module:
        cfg = self.cfg
        non_linear = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
        if non_linear:
            raise UnsupportedModelError(f"bitsandbytes replaces nn.Linear only; selected but not nn.Linear: "
                                        f"{non_linear[:6]}")
        self.config = bnb_config(cfg.bits, cfg.bnb_quant_type, cfg.bnb_double_quant, COMPUTE_DTYPES[cfg.bnb_compute_dtype],
                                 cfg.bnb_int8_threshold, skip_modules(model, names))
        q = bnb_quantize(model, self.config, str(device), next(model.parameters()).dtype)
        missing = [n for n in names if not is_bnb(q.get_submodule(n))]
        if missing:
            raise ShortfallError(f"bitsandbytes quantized {len(names) - len(missing)} of the {len(names)} selected "
                                 f"linears; not: {missing[:6]}")
        return q

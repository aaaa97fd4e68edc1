"""bitsandbytes quantization of the in-memory model (int8 LLM.int8, 4-bit nf4/fp4).

The model as the earlier stages left it (pruned, trained) is written to a temporary safetensors
checkpoint and loaded back through transformers' ``BitsAndBytesConfig``, so the result is those weights
quantized, not a fresh load of the original model. Only the linears the resolver selects are quantized
(every other ``nn.Linear``, ``lm_head`` included, is kept in ``llm_int8_skip_modules``). Zeros survive:
int8 rows are scaled by their absolute maximum and 0 maps to code 0; nf4 and fp4 code books contain 0
exactly. :func:`dequantized_weight` reads a quantized weight back for the checks.
"""

from __future__ import annotations

import tempfile
from typing import Dict, List

import torch
from torch import nn


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


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a bitsandbytes linear computes with (``[out, in]``)."""
    import bitsandbytes as bnb

    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb = getattr(w, "CB", None)
        scb = getattr(w, "SCB", None)
        if cb is None:  # after a forward bitsandbytes may keep the int8 data in the parameter itself
            cb, scb = w.data, module.state.SCB
        return cb.float() * scb.float().unsqueeze(1) / 127.0
    return w.float()


def bnb_modules(model: nn.Module) -> Dict[str, nn.Module]:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}

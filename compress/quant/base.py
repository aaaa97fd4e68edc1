"""What every weight quantizer shares: its config fields and the step contract.

A grid quantizer (RTN, GPTQ, the joint SparseGPT + GPTQ) is a
:class:`~compress.calibration.loop.LinearMethod`: it gets a linear's ``[out, in]`` weight, the statistics
it declared, and the weights that must stay exactly zero (a pruned model's zeros: ``job.keep`` False),
and returns the dequantized weight (kept entries on its grid, pruned entries exactly 0) with the grid
parameters, which the quant stage keeps for saving. A model quantizer (bitsandbytes) swaps modules for
its own instead (:class:`ModelQuantizer`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from compress.calibration.loop import LinearMethod
from compress.core.config import choice, regexes
from compress.core.errors import ConfigError
from compress.core.grid import ActSpec, GridSpec
from compress.registry import MethodConfig


@dataclass
class QuantConfig(MethodConfig):
    """Fields of every quantizer."""

    bits: int = 4
    targets: List[str] = field(default_factory=lambda: [r".*"])  # regexes on module names inside a block
    ignore: List[str] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        regexes(f"{self.group}.targets/ignore", list(self.targets) + list(self.ignore))


# Named schemes (``quant.scheme``): each sets these keys (the names of llm-compressor's / compressed-tensors'
# preset schemes, which vLLM serves). Group sizes of the 4-bit schemes are left to ``quant.group_size``.
SCHEMES: Dict[str, Dict] = {
    "w8a8": dict(bits=8, type="int", group_size=-1, symmetric=True, activations="int8", act_strategy="token",
                 act_dynamic=True),
    "w8a8_static": dict(bits=8, type="int", group_size=-1, symmetric=True, activations="int8",
                        act_strategy="tensor", act_dynamic=False),
    "fp8_dynamic": dict(bits=8, type="float", group_size=-1, symmetric=True, activations="fp8",
                        act_strategy="token", act_dynamic=True),
    "fp8": dict(bits=8, type="float", group_size=0, symmetric=True, activations="fp8", act_strategy="tensor",
                act_dynamic=False),
    "w4a8": dict(bits=4, type="int", symmetric=True, activations="int8", act_strategy="token", act_dynamic=True),
    "w4a16": dict(bits=4, type="int", symmetric=True, activations="none"),
}


@dataclass
class GridConfig(QuantConfig):
    """Integer and FP8 grids (compressed-tensors ``int`` / ``float`` conventions, see
    :mod:`compress.core.grid`), with optional 8-bit input activations (simulated: quantized, dequantized,
    multiplied in float)."""

    group_size: int = 64  # input columns per scale (-1 = per output channel, 0 = per tensor); must divide every width
    symmetric: bool = True  # symmetric grid (no zero point) or asymmetric
    mse: bool = False  # search each group's clipping range for the least squared rounding error
    type: str = "int"  # weights: int, or float (FP8 E4M3: bits 8, symmetric)
    activations: str = "none"  # input activations of the quantized linears: none | int8 | fp8
    act_strategy: str = "token"  # token (a scale per token) | tensor (one scale)
    act_dynamic: bool = True  # scales from each input at run time, or static (per tensor, from calibration)
    scheme: str = "none"  # a named preset of the keys above (SCHEMES): w8a8, fp8_dynamic, ...

    def validate(self) -> None:
        super().validate()
        choice(self.key("scheme"), self.scheme, ("none",) + tuple(SCHEMES))
        if self.scheme != "none":
            self._apply_scheme()
        choice(self.key("bits"), self.bits, (2, 3, 4, 5, 6, 7, 8))
        choice(self.key("type"), self.type, ("int", "float"))
        choice(self.key("activations"), self.activations, ("none", "int8", "fp8"))
        choice(self.key("act_strategy"), self.act_strategy, ("token", "tensor"))
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < -1:
            raise ConfigError(f"{self.key('group_size')}={self.group_size!r} is not valid: a positive number of input "
                              "columns per scale, -1 (per output channel) or 0 (per tensor)")
        if self.type == "float" and (self.bits != 8 or not self.symmetric):
            raise ConfigError(f"{self.key('type')}=float is FP8 E4M3: it needs {self.key('bits')}=8 and "
                              f"{self.key('symmetric')}=true (got bits={self.bits}, symmetric={self.symmetric})")
        if self.activations != "none" and not self.act_dynamic and self.act_strategy != "tensor":
            raise ConfigError(f"{self.key('act_dynamic')}=false (static activation scales) needs "
                              f"{self.key('act_strategy')}=tensor: a static scale per token does not exist "
                              f"(got act_strategy={self.act_strategy})")

    def _apply_scheme(self) -> None:
        """Set the scheme's keys; a key given a value other than its default and the scheme's is refused."""
        defaults = {f.name: f.default for f in dataclasses.fields(GridConfig) if f.default is not dataclasses.MISSING}
        for k, v in SCHEMES[self.scheme].items():
            cur = getattr(self, k)
            if cur != v and cur != defaults.get(k, v) and not (k == "bits" and cur == QuantConfig.bits):
                raise ConfigError(f"{self.key('scheme')}={self.scheme} sets {self.key(k)}={v}, but "
                                  f"{self.key(k)}={cur} was given: drop one of them")
            setattr(self, k, v)

    @property
    def spec(self) -> GridSpec:
        return GridSpec(bits=int(self.bits), symmetric=bool(self.symmetric), group_size=int(self.group_size),
                        mse=bool(self.mse), type=self.type)

    @property
    def act(self) -> Optional[ActSpec]:
        """The input activations' 8-bit format, or None (weight-only)."""
        if self.activations == "none":
            return None
        return ActSpec(type="float" if self.activations == "fp8" else "int", strategy=self.act_strategy,
                       dynamic=bool(self.act_dynamic))

    def bits_label(self) -> str:
        """``W8A8``, ``W4A16``, ``FP8`` (weights and activations FP8), ``W8A8-FP8``... for tables and plots."""
        if self.type == "float" and self.activations == "fp8":
            return "FP8"
        w = f"W{self.bits}" + ("-FP8" if self.type == "float" else "")
        return w + ("A16" if self.activations == "none" else "A8" + ("-FP8" if self.activations == "fp8" else ""))

    def label(self) -> str:
        g = f"g{self.group_size}" if self.group_size > 0 else "ch" if self.group_size == -1 else "tensor"
        w = f"w{self.bits}" if self.type == "int" else "fp8"
        out = f"{self.method} {w} {g} {'sym' if self.symmetric else 'asym'}" + self.label_extras()
        if self.act is not None:
            out += f" a:{self.act.label()}"
        return out

    def label_extras(self) -> str:
        return " mse" if self.mse else ""


class GridMethod(LinearMethod):
    """Base of the grid quantizers: ``cfg`` is the method's own config, ``spec`` its grid."""

    kind = "quant"
    preserves_zeros = True  # a pruned model's zeros are held at zero (job.keep)

    def __init__(self, cfg: GridConfig):
        self.cfg = cfg
        self.spec = cfg.spec

    @staticmethod
    def work_floats(out_features: int, in_features: int) -> float:
        return 3.0 * out_features * in_features


class ModelQuantizer:
    """A quantizer that replaces the selected linears with its own modules (bitsandbytes):
    ``quantize(model, full_names, device) -> model`` and ``dense_weight(module)`` for the checks."""

    kind = "quant"
    needs_calibration = False

    def __init__(self, cfg):
        self.cfg = cfg

"""What every weight quantizer shares: its config fields and the step contract.

A grid quantizer (RTN, GPTQ, the joint SparseGPT + GPTQ) is a
:class:`~compress.calibration.loop.LinearMethod`: it gets a linear's ``[out, in]`` weight, the statistics
it declared, and the weights that must stay exactly zero (a pruned model's zeros: ``job.keep`` False),
and returns the dequantized weight (kept entries on its grid, pruned entries exactly 0) with the grid
parameters, which the quant stage keeps for saving. A model quantizer (bitsandbytes) swaps modules for
its own instead (:class:`ModelQuantizer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from compress.calibration.loop import LinearMethod
from compress.core.config import choice, positive, regexes
from compress.core.grid import GridSpec
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


@dataclass
class GridConfig(QuantConfig):
    """Integer grids (compressed-tensors ``int`` conventions, see :mod:`compress.core.grid`)."""

    group_size: int = 64  # input columns per scale (-1 = per output channel); must divide every width
    symmetric: bool = True  # symmetric grid (no zero point) or asymmetric
    mse: bool = False  # search each group's clipping range for the least squared rounding error

    def validate(self) -> None:
        super().validate()
        choice(self.key("bits"), self.bits, (2, 3, 4, 5, 6, 7, 8))
        if self.group_size != -1:
            positive(self.key("group_size"), self.group_size)

    @property
    def spec(self) -> GridSpec:
        return GridSpec(bits=int(self.bits), symmetric=bool(self.symmetric), group_size=int(self.group_size),
                        mse=bool(self.mse))

    def label(self) -> str:
        g = f"g{self.group_size}" if self.group_size != -1 else "ch"
        return f"{self.method} w{self.bits} {g} {'sym' if self.symmetric else 'asym'}" + self.label_extras()

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

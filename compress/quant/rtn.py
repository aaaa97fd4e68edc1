"""Round to nearest on an integer grid (per group or per channel), with an optional MSE clipping search."""

from __future__ import annotations

from dataclasses import dataclass

from compress.calibration.loop import LinearResult
from compress.core.grid import rtn
from compress.quant.base import GridConfig, GridMethod
from compress.registry import register


@dataclass
class RTNConfig(GridConfig):
    method: str = "rtn"


@register("quant", "rtn", RTNConfig)
class RTN(GridMethod):
    """Round to nearest on the grid (per group or per channel), optional MSE clipping search; no calibration"""

    needs_calibration = False

    def step(self, weight, stats, job) -> LinearResult:
        deq, scale, zero = rtn(weight, self.spec, job.keep)
        return LinearResult(deq, scale, zero, spec=self.spec)

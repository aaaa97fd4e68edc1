"""What every mask method (unstructured or N:M) shares: its config fields and the step contract.

A mask method is a :class:`~compress.calibration.loop.LinearMethod`: it declares the statistics it needs
and, for each target linear, returns the new weight with zeros where pruned. The prune stage walks the
blocks, calls it, checks what it did and reports; the method never walks blocks or registers hooks.

Their config fields come from :mod:`compress.calibration.sparsity` (:class:`MaskConfig`,
:class:`CalibratedMaskConfig`), shared with quantizers that also choose a mask.
"""

from __future__ import annotations

from compress.calibration.loop import LinearMethod
from compress.calibration.sparsity import SCHEDULES, CalibratedMaskConfig, MaskConfig

__all__ = ["SCHEDULES", "MaskConfig", "CalibratedMaskConfig", "MaskMethod"]


class MaskMethod(LinearMethod):
    """Base of the mask methods: ``cfg`` is the method's own config."""

    kind = "prune"

    def __init__(self, cfg: MaskConfig):
        self.cfg = cfg

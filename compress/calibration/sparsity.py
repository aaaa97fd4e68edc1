"""What every sparsity-choosing method shares: which weights to remove and how the calibration loop runs.

Config mixins of the calibration layer (so that a mask method and a quantizer that also chooses a mask,
such as the joint SparseGPT + GPTQ, share them without depending on each other):

* :class:`MaskConfig` (every mask method): ``sparsity``, ``pattern`` (``unstructured`` | ``N:M``),
  ``schedule`` (``uniform`` | ``list`` | ``owl``: the per-block sparsity), ``targets`` / ``ignore``,
  ``offload``;
* :class:`CalibratedMaskConfig` (methods that read calibration statistics): the block loop's mode
  (``sequential``, ``memory_budget``), ``propagate``, and the block-level refinements
  (``reconstruct_epochs``/``reconstruct_lr``, ``dense_stats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from compress.calibration.loop import LoopConfig
from compress.core.config import choice, fraction, parse_pattern, regexes
from compress.core.errors import ConfigError
from compress.registry import MethodConfig

SCHEDULES = ("uniform", "list", "owl")


@dataclass
class MaskConfig(MethodConfig):
    sparsity: float = 0.5  # fraction of weights removed (ignored for N:M, which fixes it at 1 - N/M)
    pattern: str = "unstructured"  # unstructured | N:M (N weights kept in every M consecutive inputs)
    schedule: str = "uniform"  # uniform | list | owl
    layer_sparsities: Optional[List[float]] = None  # schedule=list: one value per decoder block
    owl_m: float = 5.0  # OWL outlier threshold (multiples of the mean score)
    owl_lambda: float = 0.08  # OWL: max deviation from the target sparsity
    targets: List[str] = field(default_factory=lambda: [r".*"])  # regex on module names inside blocks
    ignore: List[str] = field(default_factory=list)
    offload: bool = False  # keep blocks on the CPU and onload one at a time (calibration passes)

    @property
    def nm(self) -> Optional[Tuple[int, int]]:
        return parse_pattern(self.pattern, self.key("pattern"))

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity)

    def validate(self) -> None:
        super().validate()
        nm = self.nm
        fraction(self.key("sparsity"), self.sparsity)
        choice(self.key("schedule"), self.schedule, SCHEDULES)
        if nm is not None and self.schedule != "uniform":
            raise ConfigError(f"{self.key('schedule')}={self.schedule!r} needs {self.key('pattern')}=unstructured "
                              "(N:M fixes each layer's sparsity)")
        if self.schedule == "list":
            if not self.layer_sparsities:
                raise ConfigError(f"{self.key('schedule')}='list' needs {self.key('layer_sparsities')} (one value "
                                  "per decoder block)")
            for s in self.layer_sparsities:
                if not 0.0 <= float(s) < 1.0:
                    raise ConfigError(f"{self.key('layer_sparsities')} has {s!r}: each must be in [0, 1)")
        if not 0 <= self.owl_lambda < 1:
            raise ConfigError(f"{self.key('owl_lambda')}={self.owl_lambda!r} is not valid: it must be in [0, 1)")
        regexes(f"{self.group}.targets/ignore", list(self.targets) + list(self.ignore))

    def label(self) -> str:
        return f"{self.method} {self.pattern if self.nm else format(float(self.sparsity), 'g')}"


@dataclass
class CalibratedMaskConfig(LoopConfig, MaskConfig):
    # sequential / memory_budget / offload: the block loop's mode (LoopConfig); options that need the single
    # pass force it under sequential=auto
    propagate: str = "pruned"  # pruned (reference) | dense: which outputs feed the next block
    # after pruning a block, refit its kept weights (masks fixed) so that the block reproduces the dense
    # model's block outputs on the calibration samples: Adam, this many epochs over the samples (0 = off).
    reconstruct_epochs: int = 0
    reconstruct_lr: float = 1e-4
    # also accumulate each linear's statistics on its inputs in the *dense* model (the dense stream,
    # single pass): statistics over both the dense and the pruned inputs of the same calibration windows
    dense_stats: bool = False

    SINGLE_PASS_KEYS = ("error_correction", "reconstruct_epochs", "dense_stats")

    def needs_single_pass(self) -> str:
        """The option that only the single pass supports, or '' (``sequential=auto`` then picks it)."""
        for key in self.SINGLE_PASS_KEYS:
            if getattr(self, key, None):
                return self.key(key)
        return ""

    def validate(self) -> None:
        super().validate()
        self.validate_loop()
        choice(self.key("propagate"), self.propagate, ("pruned", "dense"))
        if self.propagate == "dense" and self.sequential == "true":
            raise ConfigError(f"{self.key('propagate')}=dense needs {self.key('sequential')}=false or auto (the "
                              "single pass propagates pruned outputs)")
        two_pass = self.sequential == "false"
        if self.reconstruct_epochs and two_pass:
            raise ConfigError(f"{self.key('reconstruct_epochs')} > 0 needs {self.key('sequential')}=true or auto")
        if self.dense_stats and (two_pass or getattr(self, "error_correction", False)):
            raise ConfigError(f"{self.key('dense_stats')}=true needs {self.key('sequential')}=true or auto and "
                              f"{self.key('error_correction')}=false")
        if self.needs_single_pass() and self.propagate == "dense":
            raise ConfigError(f"{self.key('propagate')}=dense cannot be combined with "
                              + ", ".join(self.key(k) for k in self.SINGLE_PASS_KEYS if hasattr(self, k))
                              + " (they need the single pass)")
        if not isinstance(self.reconstruct_epochs, int) or self.reconstruct_epochs < 0 or not self.reconstruct_lr > 0:
            raise ConfigError(f"{self.key('reconstruct_epochs')} must be an integer >= 0 and "
                              f"{self.key('reconstruct_lr')} > 0")

"""Pruning: masks (pure functions), methods (registered classes), schedules and the engine."""

from compress.calibration.stats import InputStats
from compress.pruning.engine import PruneReport, prune_model, prune_targets
from compress.pruning.masks import check_nm, make_mask, nm_mask, unstructured_mask
from compress.pruning.methods import REGISTRY, PruningMethod, get_method, register, sparsegpt_prune

__all__ = ["PruneReport", "prune_model", "prune_targets", "check_nm", "make_mask", "nm_mask", "unstructured_mask",
           "REGISTRY", "InputStats", "PruningMethod", "get_method", "register", "sparsegpt_prune"]

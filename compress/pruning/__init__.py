"""Pruning: masks (pure functions), methods (registered classes), schedules and the engine."""

from compress.pruning.engine import PruneReport, prune_model, target_linears
from compress.pruning.masks import check_nm, make_mask, nm_mask, unstructured_mask
from compress.pruning.methods import REGISTRY, InputStats, PruningMethod, get_method, register, sparsegpt_prune

__all__ = ["PruneReport", "prune_model", "target_linears", "check_nm", "make_mask", "nm_mask", "unstructured_mask",
           "REGISTRY", "InputStats", "PruningMethod", "get_method", "register", "sparsegpt_prune"]

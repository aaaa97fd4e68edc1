"""Structured pruning: remove whole attention heads (GQA-aware), MLP channels or decoder blocks for real.

* :mod:`compress.structured.groups`: the role map and the structural groups of a block;
* :mod:`compress.structured.importance`: estimators (magnitude, activation, taylor, block), one interface;
* :mod:`compress.structured.lora`: the LoRA estimator (LoRAPrune), a callback of the shared trainer;
* :mod:`compress.structured.surgery`: planning, masking, physical removal, parameter and FLOP counts;
* :mod:`compress.structured.stage`: the ``prune.method=structured`` stage.
"""

from compress.structured.groups import ROLE_MAP, Roles, block_structure, roles_for
from compress.structured.surgery import (Keep, load_pruned, mask_hooks, masked_logits, plan_widths, remove_blocks,
                                         remove_width, select)

__all__ = ["ROLE_MAP", "Roles", "block_structure", "roles_for", "Keep", "load_pruned", "mask_hooks", "masked_logits",
           "plan_widths", "remove_blocks", "remove_width", "select"]

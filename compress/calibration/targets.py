"""Which modules a stage compresses: one resolver for prune, train, quant, the metrics and mask checks.

A *target* is a linear-like module inside a decoder block whose name (relative to its block, e.g.
``self_attn.q_proj``) matches one of the ``targets`` regexes and none of the ``ignore`` ones.
Linear-like means ``nn.Linear`` (bitsandbytes' linears included) or ``transformers.Conv1D`` (GPT-2
style, which stores its weight transposed, ``[in, out]``); :func:`compress.core.modules.weight_matrix` gives every one of
them as an ``[out, in]`` view, so masks and quantizers never see the storage layout.

Any other module inside a block that holds a weight matrix directly (fused MoE experts with 3-D
weights, convolutions, embeddings) and that the patterns select is *unsupported*: :meth:`Targets.require`
refuses the model by naming those modules, before any work, instead of skipping them silently. They
can be excluded explicitly with an ``ignore`` regex.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

from torch import nn

from compress.calibration.blocks import find_blocks
from compress.core.errors import UnsupportedModelError
from compress.core.modules import LINEAR_TYPES, is_linear

ALL = (r".*",)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(rx, name) for rx in patterns)


def _weight_matrices(module: nn.Module) -> List[str]:
    return [f"{n} {list(p.shape)}" for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]


def block_targets(block: nn.Module, patterns: Sequence[str] = ALL, ignore: Sequence[str] = ()) -> Dict[str, nn.Module]:
    """Linear-like modules of one block selected by ``patterns`` and not by ``ignore``, in module order."""
    return {name: mod for name, mod in block.named_modules()
            if name and is_linear(mod) and _matches(name, patterns) and not _matches(name, ignore)}


@dataclass
class Targets:
    """The resolved targets of a model (see the module docstring)."""

    model_class: str
    blocks_name: str
    patterns: Tuple[str, ...]
    ignore: Tuple[str, ...]
    per_block: List[Dict[str, nn.Module]]
    unsupported: List[str] = field(default_factory=list)  # "layers.0.mlp.experts (GptOssExperts: gate_up_proj [...])"
    linear_names: List[str] = field(default_factory=list)  # every linear-like name in block 0, selected or not

    def __len__(self) -> int:
        return sum(len(b) for b in self.per_block)

    def items(self) -> Iterator[Tuple[int, str, nn.Module]]:
        for i, mods in enumerate(self.per_block):
            for name, mod in mods.items():
                yield i, name, mod

    def flat(self) -> Dict[str, nn.Module]:
        """``{"<block>.<name>": module}`` (the names used in reports and mask dictionaries)."""
        return {f"{i}.{n}": m for i, n, m in self.items()}

    def qualified_names(self) -> List[str]:
        """Full module names in the model (``model.layers.0.self_attn.q_proj``), e.g. for peft."""
        return [f"{self.blocks_name}.{i}.{n}" for i, n, _ in self.items()]

    def describe(self) -> str:
        return (f"{self.model_class} (blocks: {self.blocks_name}, {len(self.per_block)}), targets={list(self.patterns)}, "
                f"ignore={list(self.ignore)}")

    def require(self, stage: str) -> "Targets":
        """Refuse, naming what was found, when a selected module cannot be handled or nothing is selected."""
        if self.unsupported:
            raise UnsupportedModelError(
                f"{stage}: {self.describe()} selects modules that hold weight matrices compress cannot {stage}: "
                + "; ".join(self.unsupported[:6]) + (f" (and {len(self.unsupported) - 6} more)" if len(self.unsupported) > 6 else "")
                + f". Supported are {', '.join(t.__name__ for t in LINEAR_TYPES)}. Exclude the others explicitly "
                "with an ignore regex to compress the rest.")
        if len(self) == 0:
            raise UnsupportedModelError(
                f"{stage}: {self.describe()} selects no module. Linear-like modules in block 0: "
                f"{self.linear_names or 'none'}.")
        return self


def resolve_targets(model: nn.Module, patterns: Sequence[str] = ALL, ignore: Sequence[str] = ()) -> Targets:
    """Resolve ``patterns``/``ignore`` over every decoder block of ``model`` (see :class:`Targets`)."""
    blocks_name, blocks = find_blocks(model)
    patterns, ignore = tuple(patterns), tuple(ignore)
    per_block, unsupported = [], []
    for i, block in enumerate(blocks):
        per_block.append(block_targets(block, patterns, ignore))
        for name, mod in block.named_modules():
            if is_linear(mod) or not _weight_matrices(mod):
                continue
            if _matches(name, patterns) and not _matches(name, ignore):
                unsupported.append(f"{blocks_name}.{i}{'.' + name if name else ''} ({type(mod).__name__}: {', '.join(_weight_matrices(mod))})")
    linear_names = [n for n, m in blocks[0].named_modules() if n and is_linear(m)]
    return Targets(type(model).__name__, blocks_name, patterns, ignore, per_block, unsupported, linear_names)

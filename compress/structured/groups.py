"""Structural groups of a decoder block, read from one small declarative role map and the model's config.

Structured pruning must know which linear is q and which is down. That is declared once, per naming
convention, in :data:`ROLE_MAP` (not per family code paths): the relative module names of the roles,
and the config keys that hold the sizes a removal changes. Everything else (head counts, head size,
widths, GQA grouping) is read from the model's config and checked against the module shapes, so no head
count or head size is ever assumed.

An architecture the map does not cover is refused before any work by :func:`block_structure`, with the
names it looked for and what it found. Fused projections (``qkv_proj``, ``c_attn``, ``gate_up_proj``)
are not covered: a fused weight has no per-head row blocks that a naming map could declare.

Groups (the units removed together):

* attention, ``attn_unit="kv_group"``: one KV head with all the query heads that read it (q rows of
  those heads, k and v rows of the KV head, o columns of those heads, biases alike);
* attention, ``attn_unit="query_head"``: one query head (q rows, o columns); the same number is removed
  inside every KV group, so that the GQA mapping (query head h reads KV head h // group) still holds;
* MLP channel: gate and up rows with the matching down column (fc1 row and bias, fc2 column in OPT);
* a whole decoder block (depth).

A head is a contiguous block of ``head_dim`` rows and is never split (rotary embeddings pair dimension i
with i + head_dim / 2 inside a head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from compress.calibration.blocks import find_blocks
from compress.errors import UnsupportedModelError


@dataclass(frozen=True)
class Roles:
    """One naming convention: relative module names inside a block, and the config keys to update."""

    name: str
    q: str
    k: str
    v: str
    o: str
    down: str
    up: str
    gate: Optional[str] = None  # gated MLPs (SwiGLU); None for fc1/fc2 MLPs
    heads_key: str = "num_attention_heads"
    kv_heads_key: Optional[str] = "num_key_value_heads"  # None: no GQA field (every head has its own K/V)
    # the config key holding the head size; None when the family derives it from hidden / heads (then
    # removing heads cannot be written into a config that stock from_pretrained reloads)
    head_dim_key: Optional[str] = "head_dim"
    intermediate_key: str = "intermediate_size"
    layers_key: str = "num_hidden_layers"
    # config switches that give o / down a bias (FLAP's bias compensation); they also add the other
    # attention / MLP biases, which are then written as zeros. None: the family has no such switch
    attn_bias_key: Optional[str] = "attention_bias"
    mlp_bias_key: Optional[str] = "mlp_bias"
    # attributes of the attention module that hold head counts (updated after a removal)
    attn_attrs: Tuple[str, ...] = ("num_heads", "num_key_value_heads", "num_key_value_groups")


LLAMA = Roles("llama-style", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
              o="self_attn.o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
OPT = Roles("opt-style", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
            up="fc1", down="fc2", kv_heads_key=None, head_dim_key=None, intermediate_key="ffn_dim",
            attn_bias_key="enable_bias", mlp_bias_key="enable_bias")

# model_type -> naming convention. Families whose blocks use the Llama names (q/k/v/o_proj,
# gate/up/down_proj) and a config with head_dim / num_key_value_heads / intermediate_size.
ROLE_MAP: Dict[str, Roles] = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gemma": LLAMA, "gemma2": LLAMA,
    "olmo": LLAMA, "olmo2": LLAMA, "granite": LLAMA, "smollm3": LLAMA,
    "opt": OPT,
}


@dataclass
class BlockStructure:
    """Sizes and modules of one block (all read from the model; see the module docstring)."""

    index: int
    roles: Roles
    modules: Dict[str, nn.Module]  # role -> linear (q, k, v, o, gate?, up, down)
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv


@dataclass
class ModelStructure:
    model_type: str
    roles: Roles
    blocks_name: str
    blocks: List[BlockStructure] = field(default_factory=list)

    @property
    def uniform(self) -> bool:
        b0 = self.blocks[0]
        return all((b.n_heads, b.n_kv, b.head_dim, b.intermediate) == (b0.n_heads, b0.n_kv, b0.head_dim, b0.intermediate)
                   for b in self.blocks)


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def roles_for(model) -> Roles:
    mt = getattr(text_config(model), "model_type", None) or getattr(model.config, "model_type", None)
    roles = ROLE_MAP.get(mt)
    if roles is None:
        raise UnsupportedModelError(
            f"structured pruning: {type(model).__name__} (model_type={mt!r}) is not in the role map "
            f"(compress.structured.groups.ROLE_MAP covers: {', '.join(sorted(ROLE_MAP))}). It would need the names "
            "of its q/k/v/o and MLP linears inside a block and the config keys of its head count, head size and "
            "MLP width; fused projections (qkv_proj, c_attn, gate_up_proj) cannot be declared by name.")
    return roles


def block_structure(model, roles: Optional[Roles] = None) -> ModelStructure:
    """Resolve the roles in every block and check them against the config (refusing what does not fit)."""
    roles = roles or roles_for(model)
    cfg = text_config(model)
    blocks_name, blocks = find_blocks(model)
    n_heads = getattr(cfg, roles.heads_key)
    hd = getattr(cfg, roles.head_dim_key, None) if roles.head_dim_key else None
    out = ModelStructure(getattr(cfg, "model_type", "?"), roles, blocks_name)
    names = {"q": roles.q, "k": roles.k, "v": roles.v, "o": roles.o, "up": roles.up, "down": roles.down}
    if roles.gate:
        names["gate"] = roles.gate
    for i, block in enumerate(blocks):
        mods = {}
        missing = []
        for role, rel in names.items():
            try:
                mod = block.get_submodule(rel)
            except AttributeError:
                mod = None
            if not isinstance(mod, nn.Linear):
                missing.append(f"{role}={rel}")
            else:
                mods[role] = mod
        if missing:
            linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            raise UnsupportedModelError(
                f"structured pruning: {type(model).__name__} matches the {roles.name} role map by model_type, but "
                f"block {i} has no nn.Linear at {', '.join(missing)} (its linears: {linears})")
        # per-block sizes from the shapes (a pruned, non-uniform model has its own widths per block)
        q_out, k_out = mods["q"].out_features, mods["k"].out_features
        head_dim = hd or (mods["q"].in_features // n_heads)
        if q_out % head_dim or k_out % head_dim:
            raise UnsupportedModelError(
                f"structured pruning: block {i} of {type(model).__name__}: q rows {q_out} / k rows {k_out} are not "
                f"multiples of head_dim={head_dim} ({roles.head_dim_key or 'hidden/heads'})")
        bh, bkv = q_out // head_dim, k_out // head_dim
        if bh % bkv:
            raise UnsupportedModelError(f"structured pruning: block {i}: {bh} query heads do not split into {bkv} KV groups")
        inter = mods["up"].out_features
        if mods["down"].in_features != inter or (roles.gate and mods["gate"].out_features != inter):
            raise UnsupportedModelError(f"structured pruning: block {i}: MLP widths disagree (up {inter}, down in "
                                        f"{mods['down'].in_features})")
        if mods["o"].in_features != q_out or mods["v"].out_features != k_out:
            raise UnsupportedModelError(f"structured pruning: block {i}: o/v widths disagree with q/k")
        out.blocks.append(BlockStructure(i, roles, mods, bh, bkv, head_dim, inter))
    if not out.blocks:
        raise UnsupportedModelError(f"structured pruning: {type(model).__name__} has no decoder blocks")
    return out

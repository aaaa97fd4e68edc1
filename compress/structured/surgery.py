"""What to keep, masking it, and removing the rest for real.

* :class:`Keep` lists, per block, the query heads, KV heads and MLP channels that stay (indices into the
  block's current layout). :func:`plan_widths` turns a ratio of decoder-block parameters into the number
  of attention units and channels removed per block; :func:`select` keeps the highest-scored ones.
* :func:`mask_hooks` zeroes the removed heads' and channels' contributions (forward pre-hooks on o and down
  that zero their input columns). With bias-free q/k/v this is exactly the removal; it is what the LoRA
  estimator trains through, and what the physical removal is tested against.
* :func:`remove_width` slices the linears for real and writes the new sizes into the config;
  :func:`remove_blocks` drops whole blocks, renumbers ``layer_idx`` and trims per-layer config lists, so
  that a KV cache (which is built from the config) still lines up.

All functions take the structure from :mod:`compress.calibration.roles` (fused projections included: a
role is a row range of its module); nothing here knows a family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from compress.calibration.blocks import find_blocks
from compress.calibration.roles import BlockStructure, ModelStructure, block_structure, dependent_parameters
from compress.core.errors import UnsupportedModelError
from compress.core.modules import text_config, unique_parameters


@dataclass
class Keep:
    """Indices kept in one block (sorted): query heads, KV heads, MLP channels."""

    q_heads: List[int]
    kv_heads: List[int]
    channels: List[int]

    def to_dict(self) -> Dict:
        return {"q_heads": self.q_heads, "kv_heads": self.kv_heads, "channels_kept": len(self.channels)}


@dataclass
class WidthPlan:
    """Per block: attention units and MLP channels to remove (uniform across blocks)."""

    attn_unit: str  # kv_group | query_head | none
    attn_units: int  # units per block (KV groups, or query heads per group)
    attn_remove: int
    channels: int
    channel_remove: int
    block_params: int
    removed_params: int  # per block

    @property
    def ratio(self) -> float:
        return self.removed_params / self.block_params

    def to_dict(self) -> Dict:
        return dict(attn_unit=self.attn_unit, attn_units=self.attn_units, attn_remove=self.attn_remove,
                    channels=self.channels, channel_remove=self.channel_remove, block_params=self.block_params,
                    removed_params_per_block=self.removed_params, ratio=self.ratio)


def block_params(block: nn.Module) -> int:
    return sum(p.numel() for p in unique_parameters(block))


def unit_params(b: BlockStructure, attn_unit: str) -> Tuple[int, int]:
    """Parameters removed with one attention unit and with one MLP channel (weights and biases)."""
    hd = b.head_dim

    def row(r):  # parameters of one row of a role: its input columns and its bias entry
        return b.in_features(r) + (1 if b.has_bias(r) else 0)

    per_q = hd * row("q") + hd * b.modules["o"].out_features
    per_kv = hd * row("k") + hd * row("v")
    if attn_unit == "kv_group":
        attn = b.group_size * per_q + per_kv
    elif attn_unit == "query_head":
        attn = b.n_kv * per_q  # one head inside every group
    else:
        attn = 0
    ch = sum(row(r) for r in ("gate", "up") if r in b.modules) + b.modules["down"].out_features
    return attn, ch


def plan_widths(b: BlockStructure, block_total: int, ratio: float, attn_unit: str = "kv_group",
                attn_fraction: Optional[float] = None, round_to: int = 8, prune_mlp: bool = True) -> WidthPlan:
    """How many attention units and MLP channels to remove per block for ``ratio`` of the block's parameters.

    Attention comes in coarse steps (a KV group is 1/n_kv of the attention): ``attn_fraction`` (of the
    attention units) is used as given, else the achievable fraction nearest to ``ratio`` (the lower one on a
    tie, never all units). The MLP channels make up the rest, rounded to a multiple of ``round_to`` kept
    channels. Raises when the ratio cannot be reached."""
    units = b.n_kv if attn_unit == "kv_group" else b.group_size if attn_unit == "query_head" else 0
    per_attn, per_ch = unit_params(b, attn_unit)
    target = ratio * block_total
    if units:
        if attn_fraction is None:
            options = list(range(0, units))  # never every unit
            attn_remove = min(options, key=lambda k: (abs(k / units - ratio), k))
        else:
            attn_remove = int(round(attn_fraction * units))
            if attn_remove >= units:
                raise ValueError(f"prune.attn_fraction={attn_fraction} removes all {units} attention units")
    else:
        attn_remove = 0
    rest = max(0.0, target - attn_remove * per_attn)
    ch_remove = 0
    if prune_mlp:
        keep = b.intermediate - rest / per_ch
        keep = max(round_to, int(round(keep / round_to)) * round_to) if round_to > 1 else max(1, int(round(keep)))
        ch_remove = max(0, b.intermediate - keep)
        if ch_remove >= b.intermediate:
            raise ValueError(f"ratio {ratio} would remove every MLP channel of {b.intermediate}")
    removed = attn_remove * per_attn + ch_remove * per_ch
    return WidthPlan(attn_unit if units else "none", units, attn_remove, b.intermediate, ch_remove, block_total, removed)


def channel_counts(structure: ModelStructure, plan: WidthPlan, scores: Sequence[Dict[str, torch.Tensor]],
                   uniform: bool = True, protect: Sequence[int] = (), round_to: int = 8) -> List[int]:
    """MLP channels removed per block. Uniform: ``plan.channel_remove`` everywhere. Non-uniform: the same total,
    chosen by one global ranking of the (per-module normalised) channel scores over the blocks not in
    ``protect``, each block's kept width then rounded to a multiple of ``round_to``."""
    n = len(structure.blocks)
    if uniform:
        return [plan.channel_remove] * n
    total = plan.channel_remove * n
    free = [i for i in range(n) if i not in set(protect)]
    if not free:
        raise ValueError("every block is protected: nothing can be removed")
    cand = torch.cat([scores[i]["channels"].reshape(-1).double() for i in free])
    owner = torch.cat([torch.full((structure.blocks[i].intermediate,), i) for i in free])
    low = owner[torch.argsort(cand, stable=True)[:total]]
    counts = [0] * n
    for i in free:
        b = structure.blocks[i]
        r = int((low == i).sum())
        keep = max(round_to, int(round((b.intermediate - r) / round_to)) * round_to)
        counts[i] = max(0, b.intermediate - keep)
    return counts


def select(structure: ModelStructure, plan: WidthPlan, scores: Sequence[Dict[str, torch.Tensor]],
           channel_remove: Optional[Sequence[int]] = None, protect: Sequence[int] = ()) -> List[Keep]:
    """Per block, keep the highest-scored units. ``scores[i]``: ``attn`` (one score per unit: per KV group,
    or ``[n_kv, group]`` per query head) and ``channels``. ``channel_remove``: channels removed per block
    (default ``plan.channel_remove`` in every block; see :func:`channel_counts`). Blocks in ``protect`` keep
    all their attention units."""
    keeps = []
    for i, (b, s) in enumerate(zip(structure.blocks, scores)):
        n_ch = plan.channel_remove if channel_remove is None else channel_remove[i]
        q = list(range(b.n_heads))
        kv = list(range(b.n_kv))
        if i in set(protect):
            pass
        elif plan.attn_remove and plan.attn_unit == "kv_group":
            sc = s["attn"].reshape(b.n_kv)
            drop = set(torch.argsort(sc, stable=True)[:plan.attn_remove].tolist())
            kv = [g for g in kv if g not in drop]
            q = [h for h in q if h // b.group_size not in drop]
        elif plan.attn_remove and plan.attn_unit == "query_head":
            sc = s["attn"].reshape(b.n_kv, b.group_size)
            q = []
            for g in range(b.n_kv):
                order = torch.argsort(sc[g], stable=True)[plan.attn_remove:]  # drop the lowest in each group
                q += sorted(g * b.group_size + int(j) for j in order)
        ch = list(range(b.intermediate))
        if n_ch:
            order = torch.argsort(s["channels"].reshape(-1), stable=True)[n_ch:]
            ch = sorted(int(c) for c in order)
        keeps.append(Keep(sorted(q), sorted(kv), ch))
    return keeps


# ---------------------------------------------------------------- masks
def column_masks(b: BlockStructure, keep: Keep, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Input-column masks of o (per head dims) and down (per channel), 1 = kept."""
    om = torch.zeros(b.n_heads, b.head_dim, device=device)
    om[keep.q_heads] = 1
    dm = torch.zeros(b.intermediate, device=device)
    dm[keep.channels] = 1
    return om.reshape(-1), dm


def zero_inputs_hook(module: nn.Module, mask: torch.Tensor):
    """A forward pre-hook on ``module`` multiplying its input by ``mask`` (read at each call, so a mask
    updated in place takes effect at once). Returns the handle."""
    def hook(mod, args):
        x = args[0]
        return (x * mask.to(x.dtype),) + tuple(args[1:])
    return module.register_forward_pre_hook(hook)


def mask_hooks(structure: ModelStructure, keeps: Sequence[Keep]):
    """Forward pre-hooks that zero the removed heads' and channels' inputs to o and down. Returns the handles."""
    handles = []
    for b, k in zip(structure.blocks, keeps):
        om, dm = column_masks(b, k, b.modules["o"].weight.device)
        for role, mask in (("o", om), ("down", dm)):
            if bool((mask == 0).any()):
                handles.append(zero_inputs_hook(b.modules[role], mask))
    return handles


@torch.no_grad()
def masked_logits(model: nn.Module, structure: ModelStructure, keeps: Sequence[Keep], input_ids: torch.Tensor):
    """The model's logits with the removed groups masked (what :func:`remove_width` must reproduce)."""
    handles = mask_hooks(structure, keeps)
    try:
        return model(input_ids=input_ids).logits
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- physical removal
def _slice_linear(lin: nn.Linear, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> None:
    """Shrink ``lin`` in place to the given output rows / input columns (weight, bias, and the sizes)."""
    with torch.no_grad():
        w = lin.weight
        if rows is not None:
            w = w.index_select(0, rows.to(w.device))
        if cols is not None:
            w = w.index_select(1, cols.to(w.device))
        lin.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
        if lin.bias is not None and rows is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, rows.to(w.device)).contiguous(),
                                    requires_grad=lin.bias.requires_grad)
    lin.out_features, lin.in_features = lin.weight.shape


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def remove_width_block(model: nn.Module, structure: ModelStructure, b: BlockStructure, k: Keep) -> Tuple[int, int, int]:
    """Remove one block's heads and channels not in ``k`` (see :func:`remove_width`). Each module is sliced
    once: a fused module keeps, per role in its rows, that role's kept rows."""
    roles = structure.roles
    rows: Dict[str, torch.Tensor] = {}  # role -> kept rows within the role
    cols: Dict[str, torch.Tensor] = {}  # role -> kept input columns
    heads_change = len(k.q_heads) < b.n_heads or len(k.kv_heads) < b.n_kv
    if heads_change:
        if len(k.q_heads) % max(1, len(k.kv_heads)):
            raise ValueError(f"block {b.index}: {len(k.q_heads)} query heads do not split into "
                             f"{len(k.kv_heads)} KV groups")
        for h in k.q_heads:  # GQA: every kept query head must read a kept KV head, in equal groups
            if h // b.group_size not in k.kv_heads:
                raise ValueError(f"block {b.index}: query head {h} reads KV head {h // b.group_size}, which is removed")
        per_group = {g: sum(1 for h in k.q_heads if h // b.group_size == g) for g in k.kv_heads}
        if len(set(per_group.values())) > 1:
            raise ValueError(f"block {b.index}: unequal query heads per KV group {per_group}")
        if roles.head_dim_key is None:
            raise ValueError(f"{structure.model_type}: its config has no head_dim field, so removing heads "
                             "would not reload with from_pretrained; prune MLP channels or blocks only "
                             "(prune.attn_unit=none)")
        dep = dependent_parameters(model, structure, b, "attn")
        if dep:
            raise UnsupportedModelError(f"block {b.index}: {dep[:4]} are sized by the attention width; removing heads "
                                        "would leave them the wrong size (prune.attn_unit=none keeps the heads)")
        rows["q"] = cols["o"] = _head_rows(k.q_heads, b.head_dim)
        rows["k"] = rows["v"] = _head_rows(k.kv_heads, b.head_dim)
    if len(k.channels) < b.intermediate:
        dep = dependent_parameters(model, structure, b, "mlp")
        if dep:
            raise UnsupportedModelError(f"block {b.index}: {dep[:4]} are sized by the MLP width; removing channels "
                                        "would leave them the wrong size")
        ch = torch.tensor(k.channels, dtype=torch.long)
        for r in ("gate", "up"):
            if r in b.modules:
                rows[r] = ch
        cols["down"] = ch
    for rel, rs in b.module_roles().items():
        if not any(r in rows or r in cols for r in rs):
            continue
        mod = b.modules[rs[0]]
        if any(r in rows for r in rs):  # every role of a fused module: its kept rows, shifted to its part
            sel = torch.cat([(rows[r] if r in rows else torch.arange(b.rows(r))) + b.parts[r][0] for r in rs])
            _slice_linear(mod, rows=sel if sel.numel() < mod.out_features else None,
                          cols=cols.get(rs[0]))
        else:
            _slice_linear(mod, cols=cols[rs[0]])
    if heads_change:
        attn = model.get_submodule(f"{structure.blocks_name}.{b.index}.{roles.attn_module}") if roles.attn_module \
            else None
        if attn is not None:
            nh, nkv = len(k.q_heads), len(k.kv_heads)
            for a, v in (("num_heads", nh), ("num_key_value_heads", nkv), ("num_key_value_groups", nh // nkv)):
                if a in roles.attn_attrs and hasattr(attn, a):
                    setattr(attn, a, v)
    return len(k.q_heads), len(k.kv_heads), len(k.channels)


WIDTHS_KEY = "compress_layer_widths"  # config field of a non-uniform model: one {key: size} per layer


def remove_width(model: nn.Module, structure: ModelStructure, keeps: Sequence[Keep], uniform: bool = True) -> Dict:
    """Remove the heads and channels not in ``keeps`` from every block, and write the new sizes into the
    config. Uniform widths: one value per key (stock ``from_pretrained`` reloads it). ``uniform=False``
    allows widths that differ per block: the config's keys then hold the largest and
    ``config.compress_layer_widths`` each layer's own; such a checkpoint reloads with :func:`load_pruned`
    only (stock ``from_pretrained`` refuses it with size mismatches). Returns the new sizes."""
    roles = structure.roles
    widths = [remove_width_block(model, structure, b, k) for b, k in zip(structure.blocks, keeps)]
    if len(set(widths)) != 1 and uniform:
        raise ValueError(f"non-uniform widths {sorted(set(widths))}: stock from_pretrained builds every layer from one "
                         "config (uniform widths only)")
    nh, nkv, inter = max(widths)
    cfg = text_config(model)
    b0 = structure.blocks[0]
    if len(set(widths)) != 1:
        per = [{roles.heads_key: a, roles.kv_heads_key or "kv_heads": k, roles.intermediate_key: c}
               for a, k, c in widths]
        setattr(cfg, WIDTHS_KEY, per)
        nh, nkv, inter = max(w[0] for w in widths), max(w[1] for w in widths), max(w[2] for w in widths)
    setattr(cfg, roles.heads_key, nh)
    if roles.kv_heads_key:
        setattr(cfg, roles.kv_heads_key, nkv)
    if roles.head_dim_key:
        setattr(cfg, roles.head_dim_key, b0.head_dim)  # explicit: hidden / heads no longer gives it
    setattr(cfg, roles.intermediate_key, inter)
    out = {roles.heads_key: nh, roles.kv_heads_key or "kv_heads": nkv, roles.head_dim_key or "head_dim": b0.head_dim,
           roles.intermediate_key: inter}
    if len(set(widths)) != 1:
        out["per_layer"] = getattr(cfg, WIDTHS_KEY)
    return out


def load_pruned(path, **kwargs) -> nn.Module:
    """Load a structurally pruned checkpoint. Uniform widths: exactly ``AutoModelForCausalLM.from_pretrained``.
    Non-uniform (``config.compress_layer_widths``): the model is built from its config, each block's linears
    are resized to its recorded widths, and the safetensors weights are loaded strictly (nothing
    re-initialised, nothing ignored)."""
    cfg = AutoConfig.from_pretrained(path)
    per = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, WIDTHS_KEY, None)
    if not per:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    dtype = kwargs.pop("dtype", None)
    model = AutoModelForCausalLM.from_config(cfg, **({"dtype": dtype} if dtype is not None else {}))
    st = block_structure(model)
    roles = st.roles
    for b, w in zip(st.blocks, per):
        nh, nkv, inter = w[roles.heads_key], w[roles.kv_heads_key or "kv_heads"], w[roles.intermediate_key]
        keep = Keep(list(range(nh)), list(range(nkv)), list(range(inter)))
        if nh < b.n_heads or nkv < b.n_kv:
            # keep the first heads of the first groups: only the shapes matter, the weights are loaded below
            g_new = nh // nkv
            keep.q_heads = [g * b.group_size + j for g in range(nkv) for j in range(g_new)]
        remove_width_block(model, st, b, keep)
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and getattr(cfg, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise RuntimeError(f"load_pruned({path}): missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def remove_blocks(model: nn.Module, drop: Sequence[int]) -> Dict:
    """Remove whole decoder blocks, renumber ``layer_idx`` everywhere below the kept blocks, and trim the
    config's per-layer lists (``layer_types`` and any list with one entry per layer)."""
    blocks_name, blocks = find_blocks(model)
    n = len(blocks)
    drop = sorted(set(int(d) for d in drop))
    if any(d < 0 or d >= n for d in drop) or len(drop) >= n:
        raise ValueError(f"cannot remove blocks {drop} of {n}")
    kept = [i for i in range(n) if i not in drop]
    parent = model.get_submodule(blocks_name.rsplit(".", 1)[0]) if "." in blocks_name else model
    new = nn.ModuleList([blocks[i] for i in kept])
    setattr(parent, blocks_name.rsplit(".", 1)[-1], new)
    for new_idx, block in enumerate(new):
        for mod in block.modules():
            if hasattr(mod, "layer_idx") and isinstance(getattr(mod, "layer_idx"), int):
                mod.layer_idx = new_idx
    cfg = text_config(model)
    trimmed = []
    for key, val in list(vars(cfg).items()):
        if isinstance(val, (list, tuple)) and len(val) == n and not key.startswith("_"):
            setattr(cfg, key, type(val)(val[i] for i in kept))
            trimmed.append(key)
    cfg.num_hidden_layers = len(kept)
    return {"removed_blocks": drop, "num_hidden_layers": len(kept), "trimmed_config_lists": trimmed}


# ---------------------------------------------------------------- counting
def count_params(model: nn.Module) -> Dict:
    _, blocks = find_blocks(model)
    total = sum(p.numel() for p in unique_parameters(model))
    blk = sum(block_params(b) for b in blocks)
    return {"params_total": total, "params_blocks": blk, "blocks": len(blocks)}



# ---------------------------------------------------------------- FLAP bias compensation
@torch.no_grad()
def bias_compensation(structure: ModelStructure, keeps: Sequence[Keep], means: Sequence[Dict[str, torch.Tensor]]) -> List[Dict]:
    """FLAP's baseline: what the removed inputs of o and down contributed on average, W[:, removed] @ mean(x)[removed],
    per block. ``means[i][role]``: the mean of each input column over the calibration tokens. Call before
    :func:`remove_width`; apply with :func:`add_output_bias` after it."""
    out = []
    for b, k, mu in zip(structure.blocks, keeps, means):
        comp = {}
        om, dm = column_masks(b, k, b.modules["o"].weight.device)
        for role, mask in (("o", om), ("down", dm)):
            gone = mask == 0
            if bool(gone.any()):
                w = b.modules[role].weight
                comp[role] = (w[:, gone].double() @ mu[role].to(w.device)[gone].double()).to(w.dtype)
        out.append(comp)
    return out


@torch.no_grad()
def add_output_bias(model: nn.Module, structure: ModelStructure, comps: Sequence[Dict[str, torch.Tensor]]) -> Dict:
    """Add the compensation to the biases of o / down, creating zero biases where the family has none (with every
    other bias its config switch adds, so that stock from_pretrained finds them all) and turning the switch on."""
    roles = structure.roles
    cfg = text_config(model)
    need = {r for c in comps for r in c}
    switched = {}
    groups = {"o": (roles.attn_bias_key, ("q", "k", "v", "o")), "down": (roles.mlp_bias_key, ("gate", "up", "down"))}
    for role in need:
        key, members = groups[role]
        missing = list({id(m): m for b in structure.blocks for r, m in b.modules.items()
                        if r in members and m.bias is None}.values())  # a fused module once
        if missing:
            if key is None or not hasattr(cfg, key):
                raise ValueError(f"{structure.model_type}: {role} has no bias and the family has no config switch for one; "
                                 "bias compensation cannot be saved")
            for m in missing:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                      requires_grad=False)
            setattr(cfg, key, True)
            switched[key] = True
    for b, comp in zip(structure.blocks, comps):
        for role, c in comp.items():
            b.modules[role].bias.add_(c.to(b.modules[role].bias.device))
    return {"bias_compensation": sorted(need), "config_switched_on": sorted(switched)}

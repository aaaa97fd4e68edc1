"""Module roles of a decoder block, recognised from the block's own modules and shapes, and the coupled
modules that a block transform may rescale together.

Structured pruning must know which linear is q and which is down; AWQ and SmoothQuant must know which
norm or linear feeds which linears. Both come from here, once.

**Roles.** A few naming :class:`Pattern` s are declared (relative module names of q, k, v, o, gate, up,
down, and the config keys holding the sizes a removal changes). A block is recognised by the first
pattern whose modules all exist as ``nn.Linear`` with consistent shapes; no list of ``model_type`` names
is kept, so a family whose blocks have exactly the roles of a known pattern (Gemma-3's per-head q/k norms
included) works without being listed, and one that matches none is refused by name, with what was looked
for and what was found. Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are declared by the
roles packed in their rows, in order; the split sizes come from the config (heads, KV heads, head size)
and the shapes. Head counts, head sizes and widths are never assumed: they are read from the config and
checked against the module shapes. Interleaved fusions (GPT-NeoX's ``query_key_value``) and ``Conv1D``
blocks (GPT-2's ``c_attn``) match no pattern and are refused.

**Coupled modules** (:func:`coupled_groups`): what produces the input of each group of linears, found by
tracing one forward of the block (the producer's output tensor *is* the consumer's input): the norm
before q/k/v, v before o where the shapes allow (no GQA), the norm before gate/up, up before down. A
transform rescales the producer's output features by 1/s and the consumers' input columns by s, which
leaves the block's function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from compress.calibration.blocks import BlockInputs, find_blocks
from compress.core.errors import UnsupportedModelError
from compress.core.modules import text_config

ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class Pattern:
    """One naming convention: role -> relative module name, the fused modules (name -> the roles in its
    rows, in order), and the config keys to update after a removal."""

    name: str
    roles: Dict[str, str]
    fused: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    heads_key: str = "num_attention_heads"
    kv_heads_key: Optional[str] = "num_key_value_heads"  # None: no GQA field (every head has its own K/V)
    # the config key holding the head size; removing heads needs it (hidden / heads no longer gives it)
    head_dim_key: Optional[str] = "head_dim"
    intermediate_key: str = "intermediate_size"
    layers_key: str = "num_hidden_layers"
    # config switches that give o / down a bias (FLAP's bias compensation); they also add the other
    # attention / MLP biases, which are then written as zeros
    attn_bias_key: Optional[str] = "attention_bias"
    mlp_bias_key: Optional[str] = "mlp_bias"
    # attributes of the attention module that hold head counts (updated after a removal)
    attn_attrs: Tuple[str, ...] = ("num_heads", "num_key_value_heads", "num_key_value_groups")

    @property
    def attn_module(self) -> str:
        return self.roles["o"].rsplit(".", 1)[0] if "." in self.roles["o"] else ""


LLAMA_STYLE = Pattern("llama-style", {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                                      "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                                      "down": "mlp.down_proj"})
FUSED_STYLE = Pattern("fused qkv / gate_up (Phi-3 style)",
                      {"q": "self_attn.qkv_proj", "k": "self_attn.qkv_proj", "v": "self_attn.qkv_proj",
                       "o": "self_attn.o_proj", "gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj",
                       "down": "mlp.down_proj"},
                      fused={"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")})
OPT_STYLE = Pattern("opt-style", {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                                  "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"},
                    kv_heads_key=None, head_dim_key=None, intermediate_key="ffn_dim", attn_bias_key="enable_bias",
                    mlp_bias_key="enable_bias")
PATTERNS: Tuple[Pattern, ...] = (LLAMA_STYLE, FUSED_STYLE, OPT_STYLE)


@dataclass
class BlockStructure:
    """Sizes and modules of one block (all read from the model). A role's weight is a row range of its
    module: the whole module, or its part of a fused one."""

    index: int
    pattern: Pattern
    modules: Dict[str, nn.Module]  # role -> the nn.Linear holding it (fused roles share one)
    parts: Dict[str, Tuple[int, int]]  # role -> (first row, end row) in its module
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def roles(self) -> List[str]:
        return list(self.modules)

    def rows(self, role: str) -> int:
        a, b = self.parts[role]
        return b - a

    def in_features(self, role: str) -> int:
        return self.modules[role].in_features

    def weight(self, role: str) -> torch.Tensor:
        """The role's ``[rows, in]`` weight (a view into its module's weight)."""
        a, b = self.parts[role]
        return self.modules[role].weight[a:b]

    def bias(self, role: str) -> Optional[torch.Tensor]:
        bias = self.modules[role].bias
        if bias is None:
            return None
        a, b = self.parts[role]
        return bias[a:b]

    def has_bias(self, role: str) -> bool:
        return self.modules[role].bias is not None

    def fused(self, role: str) -> bool:
        return self.pattern.roles[role] in self.pattern.fused

    def module_roles(self) -> Dict[str, List[str]]:
        """Module name -> the roles it holds, in row order (one role for an unfused linear)."""
        out: Dict[str, List[str]] = {}
        for role, rel in self.pattern.roles.items():
            if role in self.modules:
                out.setdefault(rel, []).append(role)
        for rel, rs in out.items():
            rs.sort(key=lambda r: self.parts[r][0])
        return out


@dataclass
class ModelStructure:
    model_type: str
    pattern: Pattern
    blocks_name: str
    blocks: List[BlockStructure] = field(default_factory=list)

    @property
    def roles(self) -> Pattern:  # the naming convention (kept under the name the surgery uses)
        return self.pattern

    @property
    def uniform(self) -> bool:
        b0 = self.blocks[0]
        return all((b.n_heads, b.n_kv, b.head_dim, b.intermediate) == (b0.n_heads, b0.n_kv, b0.head_dim, b0.intermediate)
                   for b in self.blocks)


def _submodule(block: nn.Module, rel: str) -> Optional[nn.Module]:
    try:
        return block.get_submodule(rel)
    except AttributeError:
        return None


def _match(pattern: Pattern, block: nn.Module, cfg, index: int) -> Tuple[Optional[BlockStructure], str]:
    """The block's structure under ``pattern``, or ``(None, why not)``."""
    mods: Dict[str, nn.Module] = {}
    missing = []
    for role, rel in pattern.roles.items():
        mod = _submodule(block, rel)
        if not isinstance(mod, nn.Linear):  # nn.Linear (bitsandbytes linears subclass it; Conv1D does not)
            missing.append(f"{role}={rel}")
        else:
            mods[role] = mod
    if missing:
        return None, f"no nn.Linear at {', '.join(missing)}"
    if not hasattr(cfg, pattern.heads_key):
        return None, f"no config key {pattern.heads_key}"
    n_heads = int(getattr(cfg, pattern.heads_key))
    n_kv_cfg = getattr(cfg, pattern.kv_heads_key, None) if pattern.kv_heads_key else None
    hd = getattr(cfg, pattern.head_dim_key, None) if pattern.head_dim_key else None
    down_in = mods["down"].in_features
    parts: Dict[str, Tuple[int, int]] = {}
    if pattern.fused:
        # split sizes: heads (from the per-block o width when heads were removed), KV heads, MLP width
        head_dim = int(hd) if hd else mods["q"].in_features // n_heads
        q_rows = mods["o"].in_features
        qkv_rows = mods["q"].out_features
        kv_rows = (qkv_rows - q_rows) // 2
        sizes = {"q": q_rows, "k": kv_rows, "v": kv_rows, "gate": down_in, "up": down_in}
        for rel, rs in pattern.fused.items():
            total = sum(sizes[r] for r in rs)
            if mods[rs[0]].out_features != total:
                return None, (f"{rel} has {mods[rs[0]].out_features} rows, not {'+'.join(str(sizes[r]) for r in rs)} "
                              f"({'+'.join(rs)})")
            start = 0
            for r in rs:
                parts[r] = (start, start + sizes[r])
                start += sizes[r]
    else:
        head_dim = int(hd) if hd else mods["q"].in_features // n_heads
    for role, mod in mods.items():
        parts.setdefault(role, (0, mod.out_features))
    q_out = parts["q"][1] - parts["q"][0]
    k_out = parts["k"][1] - parts["k"][0]
    if head_dim <= 0 or q_out % head_dim or k_out % head_dim:
        return None, (f"q rows {q_out} / k rows {k_out} are not multiples of head_dim={head_dim} "
                      f"({pattern.head_dim_key or 'hidden/heads'})")
    bh, bkv = q_out // head_dim, k_out // head_dim
    if bkv == 0 or bh % bkv:
        return None, f"{bh} query heads do not split into {bkv} KV groups"
    if n_kv_cfg is not None and index == 0 and (bh, bkv) != (n_heads, int(n_kv_cfg)) and not hasattr(
            cfg, "compress_layer_widths"):
        return None, f"{bh}/{bkv} heads in the shapes, {n_heads}/{n_kv_cfg} in the config"
    inter = parts["up"][1] - parts["up"][0]
    if down_in != inter or ("gate" in parts and parts["gate"][1] - parts["gate"][0] != inter):
        return None, f"MLP widths disagree (up {inter}, down in {down_in})"
    if mods["o"].in_features != q_out or parts["v"][1] - parts["v"][0] != k_out:
        return None, "o/v widths disagree with q/k"
    return BlockStructure(index, pattern, mods, parts, bh, bkv, head_dim, inter), ""


def block_structure(model: nn.Module, patterns: Sequence[Pattern] = PATTERNS) -> ModelStructure:
    """Recognise the roles in every block (the first pattern block 0 matches; every block must match it),
    or refuse by name (see the module docstring)."""
    cfg = text_config(model)
    mt = getattr(cfg, "model_type", None) or getattr(model.config, "model_type", "?")
    blocks_name, blocks = find_blocks(model)
    if len(blocks) == 0:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder blocks")
    tried = []
    for pattern in patterns:
        first, why = _match(pattern, blocks[0], cfg, 0)
        if first is None:
            tried.append(f"{pattern.name}: {why}")
            continue
        out = ModelStructure(mt, pattern, blocks_name, [first])
        for i in range(1, len(blocks)):
            b, why = _match(pattern, blocks[i], cfg, i)
            if b is None:
                raise UnsupportedModelError(f"{type(model).__name__} (model_type={mt!r}): block 0 matches the "
                                            f"{pattern.name} roles but block {i} does not: {why}")
            out.blocks.append(b)
        return out
    linears = [f"{n} {tuple(m.weight.shape)}" for n, m in blocks[0].named_modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type={mt!r}): its decoder blocks match no known role pattern, so compress "
        f"cannot tell which linear is q, k, v, o, gate, up or down. Tried: {'; '.join(tried)}. Linears in block 0: "
        f"{linears}. Interleaved fused projections (query_key_value) and Conv1D blocks (c_attn) are not covered.")


def dependent_parameters(model: nn.Module, structure: ModelStructure, b: BlockStructure, what: str) -> List[str]:
    """Parameters of the attention module (``what="attn"``: the parent of o) or the MLP module (``"mlp"``: the
    parent of down) outside the role linears whose shape follows the attention width (a dimension equal to
    q's or k's rows, e.g. a q_norm over the whole projection) or the MLP width: removing heads or channels
    would leave them the wrong size, so the removal is refused. Per-head norms (of size head_dim) are fine."""
    block = find_blocks(model)[1][b.index]
    rel = structure.pattern.roles["o" if what == "attn" else "down"]
    prefix = rel.rsplit(".", 1)[0] if "." in rel else ""
    parent = block.get_submodule(prefix) if prefix else block
    role_names = set(structure.pattern.roles.values())
    sizes = ({b.rows("q"), b.rows("k")} - {b.head_dim}) if what == "attn" else {b.intermediate}
    out = []
    for name, mod in parent.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (name or prefix)
        if full in role_names:
            continue
        for pn, p in mod.named_parameters(recurse=False):
            if any(d in sizes for d in p.shape):
                out.append(f"{name + '.' if name else ''}{pn} {tuple(p.shape)}")
    return out


# ---------------------------------------------------------------- coupled modules (block transforms)
@dataclass
class Coupling:
    """One group of linears reading the same input, and what produces that input.

    ``producer``: a norm (``kind="norm"``: its weight, and bias if any, scale the features) or a linear
    (``kind="linear"``: the rows ``rows`` of its weight and bias give the features). ``consumers``: role ->
    module; their input columns are the features. :meth:`fold` divides the producer's output features by
    ``s`` and multiplies the consumers' input columns by ``s``: the block computes the same function."""

    name: str  # attn_in | mlp_in (or attn_in+mlp_in when one norm feeds both) | attn_out | mlp_out
    kind: str  # norm | linear
    producer: nn.Module
    producer_name: str
    rows: Tuple[int, int]  # the producer's output features that are the consumers' input
    consumers: Dict[str, nn.Module]
    consumer_names: List[str]
    # a norm computing x_hat * (offset + weight) (Gemma's norms use 1 + weight): found by probing
    norm_offset: float = 0.0

    @property
    def width(self) -> int:
        return self.rows[1] - self.rows[0]

    @torch.no_grad()
    def fold(self, s: torch.Tensor) -> None:
        """Scale the features by ``1 / s`` at the producer and by ``s`` in the consumers (``s > 0``, one per
        feature, float32); the composition is unchanged up to rounding."""
        s = s.float()
        a, b = self.rows
        w = self.producer.weight
        if self.kind == "norm":
            w.data.copy_(((self.norm_offset + w.data.float()) / s.to(w.device) - self.norm_offset).to(w.dtype))
        else:
            w.data[a:b] = (w.data[a:b].float() / s.to(w.device).unsqueeze(1)).to(w.dtype)
        bias = getattr(self.producer, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data[a:b] = (bias.data[a:b].float() / s.to(bias.device)).to(bias.dtype)
        for mod in dict.fromkeys(self.consumers.values()):  # a fused consumer once
            cw = mod.weight
            cw.data.copy_((cw.data.float() * s.to(cw.device).unsqueeze(0)).to(cw.dtype))


def _norm_offset(norm: nn.Module, width: int) -> float:
    """0 for norms that compute ``x_hat * weight``, 1 for ``x_hat * (1 + weight)``: probed with the weight
    (and bias) set to zero, no family list."""
    w = norm.weight
    bias = getattr(norm, "bias", None)
    saved = (w.data.clone(), bias.data.clone() if isinstance(bias, torch.Tensor) else None)
    try:
        with torch.no_grad():
            w.data.zero_()
            if saved[1] is not None:
                bias.data.zero_()
            g = torch.Generator().manual_seed(0)  # a private generator: the global RNG state is left alone
            y = norm(torch.randn(2, width, generator=g).to(device=w.device, dtype=w.dtype))
    finally:
        w.data.copy_(saved[0])
        if saved[1] is not None:
            bias.data.copy_(saved[1])
    return 0.0 if float(y.abs().max()) == 0.0 else 1.0


def _is_norm(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return not isinstance(mod, nn.Linear) and isinstance(w, torch.Tensor) and w.dim() == 1


@torch.no_grad()
def coupled_groups(block: nn.Module, structure: BlockStructure, inputs: BlockInputs, batch: int = 0) -> List[Coupling]:
    """The coupled groups of one block, found by tracing one forward of ``inputs`` batch ``batch`` (see the
    module docstring): each norm whose output feeds role linears, with all of them (one norm feeding both
    attention and MLP, as in parallel blocks, makes one group); v -> o when o's input columns are v's rows
    one to one (no GQA); up -> down in a gated MLP. What cannot be folded (an input that is no norm's output,
    GQA's shared v rows, a non-gated MLP's activation) is left out."""
    names = {id(m): n for n, m in block.named_modules()}
    produced: Dict[int, nn.Module] = {}
    consumed: Dict[str, int] = {}
    role_mods = {id(m) for m in structure.modules.values()}
    keep_alive = []
    handles = []

    def post(m, args, out):
        if isinstance(out, torch.Tensor):
            produced[id(out)] = m
            keep_alive.append(out)  # ids stay unique while the trace runs

    def pre(m, args):
        consumed.setdefault(names[id(m)], id(args[0]))

    for name, mod in block.named_modules():
        if name and _is_norm(mod):
            handles.append(mod.register_forward_hook(post))
        if id(mod) in role_mods:
            handles.append(mod.register_forward_pre_hook(pre))
    try:
        inputs.call(block, batch)
    finally:
        for h in handles:
            h.remove()
    s, p = structure, structure.pattern
    by_producer: Dict[int, List[str]] = {}
    for role in [r for r in ("q", "k", "v", "gate", "up") if r in s.modules]:
        prod = produced.get(consumed.get(p.roles[role], -1))
        if prod is not None:
            by_producer.setdefault(id(prod), []).append(role)
    groups: List[Coupling] = []
    for pid, roles in by_producer.items():
        prod = next(m for m in block.modules() if id(m) == pid)
        width = s.modules[roles[0]].in_features
        if prod.weight.numel() != width:
            continue
        kinds = {"attn" if r in ("q", "k", "v") else "mlp" for r in roles}
        gname = "+".join(f"{k}_in" for k in sorted(kinds))
        groups.append(Coupling(gname, "norm", prod, names[pid], (0, width), {r: s.modules[r] for r in roles},
                               list(dict.fromkeys(p.roles[r] for r in roles)), _norm_offset(prod, width)))
    if s.n_kv == s.n_heads:  # v -> o: o's input columns are v's rows one to one
        groups.append(Coupling("attn_out", "linear", s.modules["v"], p.roles["v"], s.parts["v"],
                               {"o": s.modules["o"]}, [p.roles["o"]]))
    if "gate" in s.modules:  # down reads act(gate) * up: scaling up's rows scales it exactly
        groups.append(Coupling("mlp_out", "linear", s.modules["up"], p.roles["up"], s.parts["up"],
                               {"down": s.modules["down"]}, [p.roles["down"]]))
    return groups

"""Decoder blocks and their inputs: find the blocks, capture what each block receives, replay it.

1. :func:`find_blocks` finds the decoder blocks from the model's own structure (``_no_split_modules``,
   else the largest ``ModuleList`` of identical modules); nothing is hard-coded per family.
2. :func:`capture_block_inputs` records, per calibration batch, the first block's hidden states and
   *every* block's own other arguments (masks, position embeddings, ...). Families with per-layer
   attention types (sliding-window and full attention, each with its own mask and rotary embeddings:
   Gemma 2/3, Cohere2, Qwen2 with sliding layers, ...) pass each block different arguments, so the
   arguments of block 0 must not be replayed to the others. Only the hidden states flow from block to
   block when the pipeline replays them.

How the per-block arguments are captured without running the blocks: every block's ``forward`` is
swapped for a recorder that stores its arguments and hands the hidden states on unchanged, and the
last one stops the forward. So each batch costs the embeddings and the mask/rotary set-up only. One
real forward of a short probe (the first 64 tokens of the first sample; blocks running, arguments
recorded by pre-hooks), compared with the recorders' view of the same probe, checks that the model
computes no block argument from a previous block's output; a model that does is refused, since its
arguments could not be replayed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from compress.core.errors import UnsupportedModelError

CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")


class _StopForward(Exception):
    """Raised inside the forward once the last block has been reached."""


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """Return ``(qualified name, ModuleList)`` of the decoder blocks."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    best: Optional[Tuple[str, nn.ModuleList]] = None
    fallback: Optional[Tuple[str, nn.ModuleList]] = None
    for qname, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        types = {type(m) for m in mod}
        if len(types) != 1:
            continue
        if names and type(mod[0]).__name__ in names:
            if best is None or len(mod) > len(best[1]):
                best = (qname, mod)
        if fallback is None or len(mod) > len(fallback[1]):
            fallback = (qname, mod)
    found = best or fallback
    if found is None:
        raise UnsupportedModelError(f"could not find the decoder blocks of {type(model).__name__}: "
                                    "no ModuleList of identical modules")
    return found


@dataclass
class BlockInputs:
    """The inputs of one block: per batch, the hidden states and the block's own other arguments."""

    hidden: List[torch.Tensor] = field(default_factory=list)
    args: List[tuple] = field(default_factory=list)  # positional args after hidden_states
    kwargs: List[Dict[str, Any]] = field(default_factory=list)
    hidden_in_kwargs: bool = False

    def __len__(self):
        return len(self.hidden)

    def call(self, block: nn.Module, i: int, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.hidden[i] if hidden is None else hidden
        if self.hidden_in_kwargs:
            out = block(*self.args[i], hidden_states=h, **self.kwargs[i])
        else:
            out = block(h, *self.args[i], **self.kwargs[i])
        return out[0] if isinstance(out, (tuple, list)) else out

    def with_hidden(self, hidden: List[torch.Tensor]) -> "BlockInputs":
        """The same block's arguments with other hidden states (e.g. the dense stream's)."""
        return BlockInputs(hidden, self.args, self.kwargs, self.hidden_in_kwargs)

    def ntokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@dataclass
class CapturedInputs:
    """What :func:`capture_block_inputs` records: the first block's hidden states per batch, and every
    block's own arguments per batch (``args[block][batch]``, ``kwargs[block][batch]``). Arguments that
    the model shares between blocks (one rotary tensor, one mask per attention type) are stored once:
    the lists hold references to the same tensors."""

    hidden: List[torch.Tensor]
    args: List[List[tuple]]
    kwargs: List[List[Dict[str, Any]]]
    hidden_in_kwargs: List[bool]
    tuple_out: bool = False  # the blocks return a tuple (hidden states first)

    def __len__(self):
        return len(self.hidden)

    @property
    def nblocks(self) -> int:
        return len(self.args)

    def block(self, idx: int, hidden: Optional[List[torch.Tensor]] = None) -> BlockInputs:
        """Block ``idx``'s inputs: its own arguments with ``hidden`` (default: the first block's inputs)."""
        return BlockInputs(self.hidden if hidden is None else hidden, self.args[idx], self.kwargs[idx],
                           self.hidden_in_kwargs[idx])

    def per_block_keys(self) -> List[str]:
        """Names of the arguments whose values differ between blocks (e.g. ``attention_mask`` for a model
        with sliding-window layers): empty when every block receives the same arguments."""
        differ = set()
        for i in range(1, self.nblocks):
            for b in range(len(self)):
                a, k = self.kwargs[0][b], self.kwargs[i][b]
                differ |= {key for key in set(a) | set(k) if not _same(a.get(key), k.get(key))}
                if not _same(self.args[0][b], self.args[i][b]):
                    differ.add("<positional>")
        return sorted(differ)


def _same(a, b) -> bool:
    """Structural equality of block arguments (tensors by value)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b.to(a.device)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    try:
        eq = a == b
        return eq if isinstance(eq, bool) else True
    except Exception:  # objects that cannot be compared: same type is all we can check
        return True


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _split_call(args: tuple, kwargs: dict):
    """``(hidden, other positional args, kwargs without caches, hidden_in_kwargs)`` of a block call."""
    kw = dict(kwargs)
    if args:
        hidden, rest, in_kw = args[0], tuple(args[1:]), False
    else:
        hidden, rest, in_kw = kw.pop("hidden_states"), (), True
    # caches are not wanted during calibration; everything else is replayed as received
    for k in CACHE_KWARGS:
        if k in kw:
            kw[k] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    # positional cache arguments (GPT-2 passes the cache second) are None with use_cache=False
    return hidden, rest, kw, in_kw


@contextlib.contextmanager
def _onloaded(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, device, offload: bool, store=None):
    """Put everything but the blocks on ``device`` (blocks stay where they are when offloading). With a
    ``store`` that has an ``outer`` context (a model on the meta device), that context loads what lies
    outside the blocks and frees it after."""
    if store is not None and hasattr(store, "outer"):
        with store.outer(device):
            for name, buf in model.named_buffers():  # e.g. rotary frequencies, computed at construction
                if not name.startswith(blocks_name + ".") and buf.device != torch.device(device) and not buf.is_meta:
                    mod_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
                    setattr(model.get_submodule(mod_name), attr, buf.to(device))
            yield
        return
    if not offload:
        model.to(device)
        yield
        return
    # detach the blocks while moving the model, so that model.to() leaves them where they are
    parent = model.get_submodule(blocks_name.rsplit(".", 1)[0]) if "." in blocks_name else model
    attr = blocks_name.rsplit(".", 1)[-1]
    setattr(parent, attr, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, attr, blocks)
    yield


def _forward(model, batch):
    try:
        model(input_ids=batch, use_cache=False)
    except _StopForward:
        return True
    return False


@torch.no_grad()
def _real_first_batch(model, blocks, batch, device, offload, store=None) -> Tuple[List[Tuple[tuple, dict]], bool]:
    """One real forward of ``batch`` through every block (onloading each when offloaded), recording each
    block's arguments with pre-hooks. Returns them and whether a block returns a tuple."""
    seen: List[Tuple[tuple, dict]] = []
    tuple_out = [False]
    last = len(blocks) - 1

    def pre(i):
        def hook(module, args, kwargs):
            if store is not None:
                store.onload(i, module, device)
            elif offload:
                module.to(device)
            _, rest, kw, _ = _split_call(args, kwargs)
            seen.append((rest, kw))
        return hook

    def post(i):
        def hook(module, args, kwargs, out):
            if store is not None:
                store.release(i, module)
            elif offload:
                module.to("cpu")
            if i == 0:
                tuple_out[0] = isinstance(out, (tuple, list))
            if i == last:
                raise _StopForward
        return hook

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post(i), with_kwargs=True))
    try:
        _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen, tuple_out[0]


def _stub_capture(model, blocks_name, blocks, batches, tuple_out: bool) -> CapturedInputs:
    """Every block's arguments for each batch, the blocks' forwards swapped for recorders that hand the
    hidden states on unchanged (the last one stops the forward)."""
    n = len(blocks)
    cap = CapturedInputs([], [[] for _ in range(n)], [[] for _ in range(n)], [False] * n)
    calls = [0] * n

    def recorder(i):
        def forward(*args, **kwargs):
            hidden, rest, kw, in_kw = _split_call(args, kwargs)
            calls[i] += 1
            if i == 0:
                cap.hidden.append(hidden)
            cap.args[i].append(rest)
            cap.kwargs[i].append(kw)
            cap.hidden_in_kwargs[i] = in_kw
            if i == n - 1:
                raise _StopForward
            return (hidden,) if tuple_out else hidden
        return forward

    own = [b.__dict__.get("forward") for b in blocks]  # e.g. accelerate hooks set an instance forward
    for i, b in enumerate(blocks):
        b.forward = recorder(i)
    try:
        for bi, batch in enumerate(batches):
            if not _forward(model, batch) or any(c != bi + 1 for c in calls):
                raise UnsupportedModelError(
                    f"{type(model).__name__}: calling the model did not call each of its {n} decoder blocks "
                    f"({blocks_name}) exactly once per forward (calls per block: {calls}); compress "
                    "calibrates block by block and cannot replay this model")
    finally:
        for b, f in zip(blocks, own):
            if f is None:
                del b.forward
            else:
                b.forward = f
    return cap


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1, device=None,
                         offload: bool = False, check: bool = True, check_tokens: int = 64, store=None) -> CapturedInputs:
    """Record the first block's hidden states and every block's own arguments, per batch of ``input_ids``.

    ``check``: run the first ``check_tokens`` tokens of the first sample through the real blocks once, and
    through the recorders, and verify that the recorded arguments equal those the blocks really receive
    (refusing the model otherwise). It costs about ``check_tokens`` tokens of one forward (and, for a
    model on the meta device, one read of every block).

    ``store``: where the blocks live between turns (:mod:`compress.calibration.runner`); one with an
    ``outer`` context holds a model on the meta device (:class:`compress.calibration.onload.DiskBlocks`).
    """
    blocks_name, blocks = find_blocks(model)
    if device is None:
        device = next(p.device for p in model.parameters() if not p.is_meta) if store is None else torch.device("cpu")
    device = torch.device(device)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    tuple_out = False
    try:
        with _onloaded(model, blocks_name, blocks, device, offload, store):
            batches = [input_ids[s:s + batch_size].to(device) for s in range(0, input_ids.shape[0], batch_size)]
            if check and batches:
                probe = batches[0][:1, :check_tokens]
                real, tuple_out = _real_first_batch(model, blocks, probe, device, offload, store)
                stub = _stub_capture(model, blocks_name, blocks, [probe], tuple_out)
                bad = [i for i, (rest, kw) in enumerate(real)
                       if not (_same(rest, stub.args[i][0]) and _same(kw, stub.kwargs[i][0]))]
                if bad:
                    keys = sorted({k for i in bad for k in set(real[i][1]) | set(stub.kwargs[i][0])
                                   if not _same(real[i][1].get(k), stub.kwargs[i][0].get(k))})
                    raise UnsupportedModelError(
                        f"{type(model).__name__}: the arguments of decoder blocks {bad[:8]} depend on what earlier "
                        f"blocks compute (differing: {keys or 'positional arguments'}), so they cannot be recorded "
                        "once and replayed block by block; compress refuses this model rather than calibrate on "
                        "wrong activations")
            cap = _stub_capture(model, blocks_name, blocks, batches, tuple_out)
            cap.tuple_out = tuple_out
    finally:
        model.config.use_cache = use_cache
    if len(cap) == 0:
        raise RuntimeError("capture failed: no calibration batch reached the first decoder block")
    return cap


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: BlockInputs) -> List[torch.Tensor]:
    return [inputs.call(block, i) for i in range(len(inputs))]


@torch.no_grad()
def forward_after_blocks(model: nn.Module, input_ids: torch.Tensor, final_hidden: torch.Tensor, tuple_out: bool):
    """The model's own forward of ``input_ids`` with the blocks replaced by ``final_hidden`` (the last block's
    outputs, computed elsewhere, e.g. block by block from disk): whatever the model does after its blocks
    (final norm, head, logit soft-capping) runs as written. Returns the model's output."""
    _, blocks = find_blocks(model)
    own = [b.__dict__.get("forward") for b in blocks]

    def first(*args, **kwargs):
        return (final_hidden,) if tuple_out else final_hidden

    def passthrough(*args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if tuple_out else h

    for i, b in enumerate(blocks):
        b.forward = first if i == 0 else passthrough
    try:
        return model(input_ids=input_ids, use_cache=False)
    finally:
        for b, f in zip(blocks, own):
            if f is None:
                del b.forward
            else:
                b.forward = f

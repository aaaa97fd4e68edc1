"""The sequential calibration pipeline shared by every calibration-based method.

1. :func:`find_blocks` finds the decoder blocks from the model's own structure (``_no_split_modules``,
   else the largest ``ModuleList`` of identical modules); nothing is hard-coded per family.
2. :func:`capture_block_inputs` runs the model up to the first block and records, per batch, the
   hidden states and *every* other argument the block receives (position embeddings, masks, cache
   objects, ...), using a forward pre-hook with kwargs and a dedicated stop exception.
3. :func:`run_sequential` walks the blocks one at a time: onload the block, let the method process it
   (collect statistics, compress), compute the outputs that feed the next block, offload the block.

With ``offload=True`` the blocks stay on the CPU and only the block being processed (plus its
activations) lives on the compute device, so a model larger than the GPU can be calibrated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm


class _StopForward(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


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
        raise ValueError(f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of identical modules")
    return found


@dataclass
class BlockInputs:
    """The captured inputs of a block: one entry per batch."""

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
        return BlockInputs(hidden, self.args, self.kwargs, self.hidden_in_kwargs)

    def ntokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


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


@contextlib.contextmanager
def _onloaded(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, device, offload: bool):
    """Put everything but the blocks on ``device`` (blocks stay where they are when offloading)."""
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


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1, device=None,
                         offload: bool = False) -> BlockInputs:
    """Run the model up to its first block and record every input that block receives, per batch."""
    blocks_name, blocks = find_blocks(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    captured = BlockInputs()

    def hook(module, args, kwargs):
        if args:
            captured.hidden.append(args[0])
            captured.args.append(tuple(args[1:]))
        else:
            captured.hidden.append(kwargs.pop("hidden_states"))
            captured.hidden_in_kwargs = True
            captured.args.append(())
        kw = dict(kwargs)
        # caches are not wanted during calibration; everything else is replayed as received
        for k in ("past_key_value", "past_key_values", "layer_past"):
            if k in kw:
                kw[k] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        captured.kwargs.append(kw)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        with _onloaded(model, blocks_name, blocks, device, offload):
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        model.config.use_cache = use_cache
    if len(captured) == 0:
        raise RuntimeError("capture failed: the first decoder block was never called")
    return captured


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: BlockInputs) -> List[torch.Tensor]:
    return [inputs.call(block, i) for i in range(len(inputs))]


@dataclass
class BlockResult:
    """What a block processor hands back: outputs it already computed, to save forward passes.

    ``outputs``: the compressed block's outputs on ``inputs``; ``dense_outputs``: the block's outputs
    before compression on the dense stream (required when a dense stream is carried).
    """

    outputs: Optional[List[torch.Tensor]] = None
    dense_outputs: Optional[List[torch.Tensor]] = None


BlockFn = Callable[[int, nn.Module, BlockInputs, Optional[BlockInputs]], Optional[BlockResult]]


@torch.no_grad()
def run_sequential(model: nn.Module, input_ids: torch.Tensor, process_block: BlockFn, batch_size: int = 1,
                   device=None, offload: bool = False, propagate: str = "pruned", dense_stream: bool = False,
                   progress: bool = True, desc: str = "calibrate") -> None:
    """Walk the decoder blocks one at a time.

    ``process_block(index, block, inputs, dense_inputs)`` collects statistics and compresses the block
    in place. ``inputs`` are the block inputs that feed statistics: the compressed model's
    activations (``propagate="pruned"``, the reference behaviour) or the dense model's
    (``propagate="dense"``). With ``dense_stream=True`` the dense model's activations are carried as
    well and passed as ``dense_inputs`` (e.g. as regression targets); the processor must then return
    the dense outputs, computed before it compresses the block.
    """
    if propagate not in ("pruned", "dense"):
        raise ValueError(f"propagate={propagate!r}: expected 'pruned' or 'dense'")
    _, blocks = find_blocks(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    inputs = capture_block_inputs(model, input_ids, batch_size, device, offload)
    dense = inputs if dense_stream and propagate == "pruned" else None
    for idx in tqdm(range(len(blocks)), desc=desc, disable=not progress, unit="block"):
        block = blocks[idx]
        if offload:
            block.to(device)
        res = process_block(idx, block, inputs, dense) or BlockResult()
        if propagate == "dense":
            if res.dense_outputs is None and res.outputs is not None:
                raise RuntimeError("propagate=dense: process_block compressed the block without returning dense outputs")
            outs = res.dense_outputs if res.dense_outputs is not None else block_outputs(block, inputs)
        else:
            outs = res.outputs if res.outputs is not None else block_outputs(block, inputs)
            if dense is not None:
                if res.dense_outputs is None:
                    raise RuntimeError("dense_stream=True: process_block must return the dense outputs")
                dense = dense.with_hidden(res.dense_outputs)
        if offload:
            block.to("cpu")
        inputs = inputs.with_hidden(outs)
    if offload:
        model.to("cpu")

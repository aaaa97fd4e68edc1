"""The sequential calibration pipeline: walk the decoder blocks one at a time.

Onload the block, let the method process it (collect statistics, compress), compute the outputs that
feed the next block, offload the block. With ``offload=True`` the blocks stay on the CPU and only the
block being processed (plus its activations) lives on the compute device, so a model larger than the
GPU can be calibrated. Each block is called with its own captured arguments; only the hidden states
flow from block to block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.calibration.blocks import BlockInputs, block_outputs, capture_block_inputs, find_blocks
from compress.calibration.checkpoint import BlockCheckpoints
from compress.core.distributed import rank, world_size


@dataclass
class BlockResult:
    """What a block processor hands back: outputs it already computed, to save forward passes.

    ``outputs``: the compressed block's outputs on ``inputs``; ``dense_outputs``: the block's outputs
    before compression on the dense stream (required when a dense stream is carried).
    """

    outputs: Optional[List[torch.Tensor]] = None
    dense_outputs: Optional[List[torch.Tensor]] = None


BlockFn = Callable[[int, nn.Module, BlockInputs, Optional[BlockInputs]], Optional[BlockResult]]


class Persist(Protocol):
    """What a walk that checkpoints keeps of each finished block beyond its weights: ``state_of(idx)`` ->
    (JSON-able report entries, tensors), ``restore(idx, state, tensors)`` on resume, and the block mode."""

    mode: Dict

    def state_of(self, idx: int) -> Tuple[Dict, Dict[str, torch.Tensor]]:
        ...

    def restore(self, idx: int, state: Dict, tensors: Dict[str, torch.Tensor]) -> None:
        ...


class InMemoryBlocks:
    """The blocks live in the model (on the CPU between turns with ``offload``)."""

    def __init__(self, offload: bool = False):
        self.offload = offload

    def onload(self, idx: int, block: nn.Module, device) -> None:
        if self.offload:
            block.to(device)

    def finished(self, idx: int, block: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
        """The block is done: what a checkpoint stores of it (its state dict), before it is put away."""
        return block.state_dict()

    def release(self, idx: int, block: nn.Module) -> None:
        if self.offload:
            block.to("cpu")

    def restore(self, idx: int, block: nn.Module, state: Dict[str, torch.Tensor]) -> None:
        block.load_state_dict(state, strict=True)


@torch.no_grad()
def run_sequential(model: nn.Module, input_ids: torch.Tensor, process_block: BlockFn, batch_size: int = 1,
                   device=None, offload: bool = False, propagate: str = "pruned", dense_stream: bool = False,
                   progress: bool = True, desc: str = "calibrate", checkpoints: Optional[BlockCheckpoints] = None,
                   persist: Optional[Persist] = None, store=None, keep_outputs: bool = False) -> Dict:
    """Walk the decoder blocks one at a time.

    ``process_block(index, block, inputs, dense_inputs)`` collects statistics and compresses the block
    in place. ``inputs`` are the block inputs that feed statistics: the compressed model's
    activations (``propagate="pruned"``, the reference behaviour) or the dense model's
    (``propagate="dense"``). With ``dense_stream=True`` the dense model's activations are carried as
    well and passed as ``dense_inputs`` (e.g. as regression targets); the processor must then return
    the dense outputs, computed before it compresses the block.

    With ``checkpoints`` every finished block is checkpointed (its state, the next block's inputs and
    ``persist.state_of(idx)``), and a walk that finds a checkpoint restores the finished blocks and their
    states (``persist.restore``) and continues with the next one (:mod:`compress.calibration.checkpoint`).
    ``store`` says where the blocks live between turns: in the model (:class:`InMemoryBlocks`, the default)
    or on disk (:class:`compress.calibration.onload.DiskBlocks`: read when their turn comes, written to the
    output and freed after).
    Returns what the walk did: ``{"resumed_at": block or None, "checkpoint_write_seconds": s}``, with
    ``keep_outputs`` also the last block's outputs per batch (``outputs``) and ``tuple_out``.
    """
    if propagate not in ("pruned", "dense"):
        raise ValueError(f"propagate={propagate!r}: expected 'pruned' or 'dense'")
    _, blocks = find_blocks(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    store = store if store is not None else InMemoryBlocks(offload)
    if world_size() > 1:  # each rank takes every world_size-th sample; the statistics are summed over ranks
        if input_ids.shape[0] < world_size():
            raise ValueError(f"{input_ids.shape[0]} calibration samples cannot be split over {world_size()} ranks")
        input_ids = input_ids[rank()::world_size()]
    captured = capture_block_inputs(model, input_ids, batch_size, device, offload, store=store)
    hidden, captured.hidden = captured.hidden, []  # only the current block's inputs stay alive
    dense_hidden = hidden if dense_stream and propagate == "pruned" else None
    start, done = 0, {"resumed_at": None}
    resume = checkpoints.resume() if checkpoints is not None else None
    if resume is not None:
        for idx in range(resume.next_block):
            block_state, tensors = checkpoints.load_block(idx)
            if block_state:
                store.restore(idx, blocks[idx], block_state)
            if persist is not None:
                persist.restore(idx, resume.states[idx], tensors)
        if persist is not None and resume.mode:
            persist.mode = resume.mode
        start, done["resumed_at"] = resume.next_block, resume.next_block
        if start < len(blocks):
            hidden = [h.to(device) for h in resume.hidden]
            if dense_hidden is not None:
                dense_hidden = [h.to(device) for h in resume.dense_hidden] if resume.dense_hidden is not None else hidden
        if progress:
            print(f"{desc}: resumed from {checkpoints.path}: blocks 0-{start - 1} restored, continuing at block {start}")
    for idx in tqdm(range(start, len(blocks)), desc=desc, disable=not progress, unit="block", initial=start,
                    total=len(blocks)):
        block = blocks[idx]
        store.onload(idx, block, device)
        inputs = captured.block(idx, hidden)
        dense = captured.block(idx, dense_hidden) if dense_hidden is not None else None
        res = process_block(idx, block, inputs, dense) or BlockResult()
        if propagate == "dense":
            if res.dense_outputs is None and res.outputs is not None:
                raise RuntimeError("propagate=dense: process_block compressed the block without returning dense outputs")
            hidden = res.dense_outputs if res.dense_outputs is not None else block_outputs(block, inputs)
        else:
            hidden = res.outputs if res.outputs is not None else block_outputs(block, inputs)
            if dense_hidden is not None:
                if res.dense_outputs is None:
                    raise RuntimeError("dense_stream=True: process_block must return the dense outputs")
                dense_hidden = res.dense_outputs
        del inputs, dense, res
        block_state = store.finished(idx, block)  # a store on disk writes the block to the output here
        if checkpoints is not None:
            state, tensors = persist.state_of(idx) if persist is not None else ({}, {})
            checkpoints.save(idx, block_state, hidden, dense_hidden, state, tensors, mode=getattr(persist, "mode", None))
        del block_state
        store.release(idx, block)
    if offload and isinstance(store, InMemoryBlocks):
        model.to("cpu")
    if checkpoints is not None:
        done["checkpoint_write_seconds"] = round(checkpoints.write_seconds, 3)
    if keep_outputs:
        done.update(outputs=hidden, tuple_out=captured.tuple_out)
    return done

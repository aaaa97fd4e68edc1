"""The sequential calibration pipeline: walk the decoder blocks one at a time.

Onload the block, let the method process it (collect statistics, compress), compute the outputs that
feed the next block, offload the block. With ``offload=True`` the blocks stay on the CPU and only the
block being processed (plus its activations) lives on the compute device, so a model larger than the
GPU can be calibrated. Each block is called with its own captured arguments; only the hidden states
flow from block to block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.calibration.blocks import BlockInputs, block_outputs, capture_block_inputs, find_blocks


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
    captured = capture_block_inputs(model, input_ids, batch_size, device, offload)
    hidden, captured.hidden = captured.hidden, []  # only the current block's inputs stay alive
    dense_hidden = hidden if dense_stream and propagate == "pruned" else None
    for idx in tqdm(range(len(blocks)), desc=desc, disable=not progress, unit="block"):
        block = blocks[idx]
        if offload:
            block.to(device)
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
        if offload:
            block.to("cpu")
    if offload:
        model.to("cpu")

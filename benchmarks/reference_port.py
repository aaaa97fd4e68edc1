"""A same-machine timing baseline: the *loop structure* of the Wanda authors' reference code, rewritten.

The reference repository (locuslab/wanda: ``prune_magnitude``, ``prune_wanda``, ``prune_sparsegpt``,
``WrappedGPT`` and its SparseGPT port) is not on PyPI and this machine has no network, so it cannot be
run here, and it targets transformers 4.x (it calls a Llama layer with ``attention_mask`` and
``position_ids`` only). This module re-implements what it does, step for step, on top of transformers
5, so that "at most half the reference's time" can be measured in one process, on one machine:

* the model runs up to the first block and the block inputs are cached (here with every kwarg the block
  receives, which transformers 5 needs);
* per block: hooks on *every* ``nn.Linear`` (q, k and v each get their own statistics), one forward per
  calibration sample (batch 1) to collect statistics, prune each linear, then a **second** forward per
  sample through the pruned block for the next block's inputs;
* Wanda: the running mean of ``||x||^2`` per input channel (``scaler_row``), score ``|W| sqrt(scaler_row)``,
  a stable sort per output row (unstructured) or ``topk`` per group of M columns in a Python loop (N:M);
* SparseGPT: one float32 ``H = 2/n sum x x^T`` per linear, damping 1% of the mean diagonal, the inverse
  by Cholesky + ``cholesky_inverse`` + Cholesky, and the column loop on the column-strided weight
  (``W1[:, i]``) with blocks of 128;
* magnitude: a sort of each flattened |W| (unstructured) or ``topk`` per M columns (N:M).

It is a benchmark baseline only: nothing in ``compress`` imports it. Its perplexities are printed next
to the issue's reference figures so that a reader can check that it does what the reference does.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from compress.calibration.blocks import capture_block_inputs, find_blocks


class _Wrapped:
    """Per-linear statistics, updated per calibration batch like the reference's ``WrappedGPT``/``SparseGPT``."""

    def __init__(self, layer: nn.Linear, hessian: bool):
        self.layer = layer
        cols = layer.weight.shape[1]
        self.nsamples = 0
        self.scaler_row = torch.zeros(cols, device=layer.weight.device)
        self.H = torch.zeros(cols, cols, device=layer.weight.device) if hessian else None

    def add_batch(self, inp: torch.Tensor):
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        if self.H is not None:
            self.H *= self.nsamples / (self.nsamples + tmp)
            self.nsamples += tmp
            inp = math.sqrt(2 / self.nsamples) * inp.float()
            self.H += inp.matmul(inp.t())
        else:
            inp = inp.type(torch.float32)
            self.scaler_row *= self.nsamples / (self.nsamples + tmp)
            self.nsamples += tmp
            self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _nm_loop_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``True`` = pruned: the ``m - n`` lowest of every ``m`` columns, one ``topk`` per column group."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    for ii in range(metric.shape[1]):
        if ii % m == 0:
            tmp = metric[:, ii:ii + m].float()
            mask.scatter_(1, ii + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    return mask


def _fasterprune(w: _Wrapped, sparsity: float, nm: Optional[Tuple[int, int]], blocksize: int = 128,
                 percdamp: float = 0.01):
    W = w.layer.weight.data.clone().float()
    H = w.H
    w.H = None
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(W.shape[1], device=W.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    prune_n, prune_m = (nm[1] - nm[0], nm[1]) if nm else (0, 0)  # the reference prunes prune_n of every prune_m
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            wcol = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i:(i + prune_m)] ** 2 / (torch.diag(Hinv1)[i:(i + prune_m)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = wcol.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (wcol - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    w.layer.weight.data = W.reshape(w.layer.weight.shape).to(w.layer.weight.data.dtype)


def _linears(block: nn.Module):
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def prune_reference_style(model: nn.Module, calib_ids: torch.Tensor, method: str, sparsity: float = 0.5,
                          nm: Optional[Tuple[int, int]] = None) -> None:
    """Prune ``model`` in place the way the reference code does (see the module docstring)."""
    _, blocks = find_blocks(model)
    if method == "magnitude":
        for block in blocks:
            for lin in _linears(block).values():
                W = lin.weight.data
                metric = torch.abs(W)
                if nm:
                    mask = _nm_loop_mask(metric, *nm)
                else:
                    thresh = torch.sort(metric.flatten())[0][int(W.numel() * sparsity)]
                    mask = metric <= thresh
                W[mask] = 0
        return
    inps = capture_block_inputs(model, calib_ids, batch_size=1)
    hidden = list(inps.hidden)
    for bi, block in enumerate(blocks):
        binp = inps.block(bi)  # this block's own arguments (masks, rotary) with the propagated hidden states
        subset = _linears(block)
        wrapped = {n: _Wrapped(m, hessian=method == "sparsegpt") for n, m in subset.items()}
        handles = [m.register_forward_hook(lambda mod, inp, out, n=n: wrapped[n].add_batch(inp[0].data))
                   for n, m in subset.items()]
        outs = [binp.call(block, j, hidden[j]) for j in range(len(hidden))]
        for h in handles:
            h.remove()
        for name, w in wrapped.items():
            if method == "sparsegpt":
                _fasterprune(w, sparsity, nm)
                continue
            W = subset[name].weight.data
            metric = torch.abs(W) * torch.sqrt(w.scaler_row.reshape((1, -1)))
            if nm:
                mask = _nm_loop_mask(metric, *nm)
            else:
                idx = torch.sort(metric, dim=-1, stable=True)[1][:, :int(metric.shape[1] * sparsity)]
                mask = torch.zeros_like(metric, dtype=torch.bool).scatter_(1, idx, True)
            W[mask] = 0
        del wrapped
        outs = [binp.call(block, j, hidden[j]) for j in range(len(hidden))]
        hidden = outs

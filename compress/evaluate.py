"""Perplexity under a pinned protocol, and the size metrics reported with it.

Protocol: the eval text is tokenized as one string (CRLF -> LF, no special tokens); it is cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped), capped at
``max_windows``; each window is scored independently (no context carried over); the result is
exp(mean token NLL) over all predicted tokens. With ``add_bos`` a BOS token is prepended to every
window as context and is not scored. The batch size only changes speed: losses are summed in float64.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compress.calibration.blocks import block_outputs, forward_after_blocks
from compress.calibration.roles import block_structure
from compress.calibration.runner import BlockResult, run_sequential
from compress.calibration.targets import resolve_targets
from compress.core.counting import flops_per_token as _flops
from compress.core.errors import UnsupportedModelError
from compress.core.modules import dense_weight, is_quantized_storage, linear_shape, unique_parameters
from compress.data import Text, load_text, tokenize


def model_device(model) -> torch.device:
    return next(p.device for p in model.parameters() if not p.is_meta)


def _streamed_logits(model, store, windows: torch.Tensor, batch_size: int, device, progress: bool):
    """Logits of every batch of ``windows`` for a model whose blocks stay on disk: the blocks are read one
    at a time (:func:`compress.calibration.runner.run_sequential` with the store), all windows go through
    each, then the model's own forward after its blocks (norm, head) runs with the head loaded."""
    walk = run_sequential(model, windows, lambda i, b, inp, d: BlockResult(outputs=block_outputs(b, inp)),
                          batch_size=batch_size, device=device, store=store, progress=progress, desc="eval (streamed)",
                          keep_outputs=True)
    with store.outer(device, head=True):
        for k, start in enumerate(range(0, windows.shape[0], batch_size)):
            batch = windows[start:start + batch_size].to(device)
            yield forward_after_blocks(model, batch, walk["outputs"][k], walk["tuple_out"]).logits


@torch.no_grad()
def perplexity_from_ids(model, ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None, batch_size: int = 1,
                        bos_token_id: Optional[int] = None, progress: bool = True, desc: str = "eval",
                        store=None, device=None) -> Dict:
    """Perplexity of ``model`` on non-overlapping windows of ``ids`` (see the module docstring). ``store``: a
    :class:`~compress.calibration.onload.DiskBlocks` for a model on the meta device (blocks streamed from
    disk, every window through one block at a time); the numbers are those of the loaded model."""
    nwin = ids.numel() // seqlen
    if max_windows is not None:
        nwin = min(nwin, max_windows)
    if nwin == 0:
        raise ValueError(f"eval text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: nwin * seqlen].view(nwin, seqlen)
    device = torch.device(device) if device is not None else model_device(model)
    nll = 0.0
    count = 0
    was_training = model.training
    model.eval()
    if bos_token_id is not None:
        windows = torch.cat([torch.full((nwin, 1), bos_token_id, dtype=windows.dtype), windows], dim=1)
    streamed = _streamed_logits(model, store, windows, batch_size, device, progress) if store is not None else None
    for start in tqdm(range(0, nwin, batch_size), desc=desc, disable=not progress or store is not None, unit="batch"):
        inputs = windows[start:start + batch_size].to(device)
        batch = inputs[:, 1:] if bos_token_id is not None else inputs
        logits = next(streamed) if streamed is not None else model(input_ids=inputs, use_cache=False).logits
        if bos_token_id is not None:
            logits, targets = logits[:, :-1], batch  # position 0 (BOS) predicts token 0
        else:
            logits, targets = logits[:, :-1], batch[:, 1:]
        # per-window sums, then accumulate in float64: independent of the batch split
        for b in range(logits.shape[0]):
            loss = F.cross_entropy(logits[b].float(), targets[b], reduction="sum")
            nll += float(loss.double())
            count += targets.shape[1]
    if streamed is not None:
        streamed.close()  # frees the head and embeddings
    model.train(was_training)
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "windows": nwin, "tokens": count}


def perplexity(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 512, max_windows: Optional[int] = 40,
               batch_size: int = 1, add_bos: bool = False, progress: bool = True, store=None, device=None) -> Dict:
    """Perplexity plus the protocol record for one dataset."""
    text: Text = load_text(dataset, role="eval")
    ids = tokenize(tokenizer, text)
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise ValueError("eval.add_bos=true but the tokenizer has no BOS token")
    out = perplexity_from_ids(model, ids, seqlen, max_windows, batch_size, bos, progress, desc=f"eval {dataset}",
                              store=store, device=device)
    out["protocol"] = {
        "dataset": text.name, "split": text.split, "origin": text.origin, "sha256": text.sha256,
        "join_rule": text.join_rule, "tokenization": "whole text, add_special_tokens=False",
        "seqlen": seqlen, "stride": seqlen, "max_windows": max_windows, "windows": out["windows"],
        "tokens_scored": out["tokens"], "text_tokens": int(ids.numel()), "bos": bool(add_bos),
        "metric": "exp(mean NLL over scored tokens)",
    }
    return out


def flops_per_token(model, seqlen: int, last_logits_only: bool = True) -> Dict:
    """Analytic forward FLOPs per token of a prefill of ``seqlen`` tokens (:func:`compress.core.counting.flops_per_token`):
    every block linear from its shape (a bitsandbytes weight is packed but multiplies as ``in x out``), the
    attention term where the roles of the blocks are recognised (``attention_counted``), the LM head."""
    shapes = [linear_shape(m) for m in resolve_targets(model).flat().values()]
    try:
        attention = [(b.n_heads, b.head_dim) for b in block_structure(model).blocks]
    except (UnsupportedModelError, AttributeError, TypeError, ValueError):
        attention = None  # no role pattern covers the blocks (or their config lacks a size): attention not counted
    head = model.get_output_embeddings()
    head_n = (head.in_features * head.out_features if hasattr(head, "in_features") else head.weight.numel()) \
        if head is not None else 0
    out = _flops(shapes, attention or [], head_n, seqlen, last_logits_only)
    out["attention_counted"] = attention is not None
    return out


def flops_metrics(model, seqlen: int) -> Dict:
    """Analytic forward FLOPs per token at ``seqlen`` (:func:`flops_per_token`), for every run, so that
    ``compare`` shows them for dense and unstructured rows too (zeros in sparse weights are counted: dense
    kernels multiply them)."""
    f = flops_per_token(model, seqlen)
    return {"flops_per_token": f["total"], "flops_seqlen": seqlen, "flops_attention_counted": f["attention_counted"]}


@torch.no_grad()
def size_metrics_from_checkpoint(model, reader, targets=(r".*",), ignore=()) -> Dict:
    """:func:`size_metrics` of a model on the meta device, from its checkpoint, one tensor at a time."""
    total = nonzero = nbytes = 0
    lin = {f"{n}.weight" for n in resolve_targets(model, targets, ignore).qualified_names()}
    lin_total = lin_zero = saved = 0
    for name in reader.names():
        t = reader.read([name])[name]
        nz = int(torch.count_nonzero(t))
        total, nonzero, nbytes = total + t.numel(), nonzero + nz, nbytes + t.numel() * t.element_size()
        if name in lin:
            zeros = t.numel() - nz
            lin_total, lin_zero = lin_total + t.numel(), lin_zero + zeros
            saved += max(0, t.numel() * t.element_size() - ((t.numel() - zeros) * t.element_size() + (t.numel() + 7) // 8))
        del t
    nbytes += sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)
    return {"params_total": total, "params_nonzero": nonzero, "sparsity": lin_zero / lin_total if lin_total else 0.0,
            "prunable_params": lin_total, "footprint_mb": nbytes / 2**20, "footprint_sparse_mb": (nbytes - saved) / 2**20}


@torch.no_grad()
def size_metrics(model, targets=(r".*",), ignore=()) -> Dict:
    """Parameter counts and footprints; ``sparsity`` is over the linears that ``targets``/``ignore`` select
    (the prune stage's own selection, through the same resolver), ``prunable_params`` their size."""
    total = nonzero = nbytes = 0
    for p in unique_parameters(model):
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
        nbytes += p.numel() * p.element_size()
    for b in model.buffers():
        nbytes += b.numel() * b.element_size()
    lin_total = lin_zero = 0
    saved = 0  # bytes saved by storing sparse linears as non-zero values + a 1-bit mask per weight
    for mod in resolve_targets(model, targets, ignore).flat().values():
        w = mod.weight
        if is_quantized_storage(mod):  # bitsandbytes: packed
            w = dense_weight(mod)
            zeros = int(w.numel() - torch.count_nonzero(w))
            lin_total += w.numel()
            lin_zero += zeros
            continue
        zeros = int((w == 0).sum())
        lin_total += w.numel()
        lin_zero += zeros
        dense_bytes = w.numel() * w.element_size()
        sparse_bytes = (w.numel() - zeros) * w.element_size() + (w.numel() + 7) // 8
        saved += max(0, dense_bytes - sparse_bytes)
    return {
        "params_total": total,
        "params_nonzero": nonzero,
        "sparsity": lin_zero / lin_total if lin_total else 0.0,
        "prunable_params": lin_total,
        "footprint_mb": nbytes / 2**20,
        # storage with sparse linears as values + bitmask (2:4 kernel metadata costs the same at 2:4)
        "footprint_sparse_mb": (nbytes - saved) / 2**20,
    }

"""One pass over the target linears of a model, for every method that compresses linears one at a time
(mask methods, grid quantizers, the joint method): the prune and quant stages both run it.

It resolves nothing and names no method: it gets the targets, the method (a
:class:`~compress.calibration.loop.LinearMethod`), the per-block sparsity (or none), and the loop settings
from the method's config, and walks the blocks through :class:`~compress.calibration.loop.BlockLoop` (or
directly, for methods without calibration). For each linear it calls ``method.step``, writes the new
weight into the model, and records one entry: its shape, zeros, the relative output error on the
calibration inputs, seconds, bits per weight when quantized, and what the method reports (damping). The
grid parameters of quantized linears are kept for saving.

Block-level refinements of the loop, read from the config when it has them: the dense stream
(``error_correction``, ``reconstruct_epochs``, ``dense_stats``), ``propagate=dense`` and block
reconstruction after the single pass.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from compress.calibration.blocks import BlockInputs, block_outputs, find_blocks
from compress.calibration.loop import BlockLoop, LinearJob, LinearMethod, LinearResult
from compress.calibration.stats import InputStats, StatsCollector
from compress.calibration.targets import Targets
from compress.core.grid import GridSpec, bits_per_weight, on_grid
from compress.core.masks import check_nm
from compress.core.memory import rss_peak_mb
from compress.core.modules import weight_matrix

SPARSE_MIN = 0.01  # a linear with more exact zeros than this is treated as pruned: its zeros are kept


@dataclass
class LinearPass:
    """What one pass did: an entry per linear and per block, the block mode, reconstruction losses, and the
    grid parameters of quantized linears (full module name -> (scale, zero))."""

    modules: List[Dict] = field(default_factory=list)
    blocks: List[Dict] = field(default_factory=list)
    mode: Dict = field(default_factory=dict)
    reconstruction: List[Dict] = field(default_factory=list)
    transforms: List[Dict] = field(default_factory=list)
    params: Dict[str, tuple] = field(default_factory=dict, repr=False)
    spec: Optional[object] = None  # the GridSpec of the quantized linears
    calib_seconds: float = 0.0
    walk: Dict = field(default_factory=dict)  # resumed_at (the first block computed, when resumed), checkpoint seconds


def keep_mask(w: torch.Tensor) -> Optional[torch.Tensor]:
    """The weights to keep at zero in a pruned linear (None when it has no real zeros)."""
    zeros = w == 0
    return ~zeros if float(zeros.float().mean()) > SPARSE_MIN else None


def _rel_err(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() - target.float()).square().sum() / target.float().square().sum().clamp_min(1e-12)


def reconstruct_block(block: nn.Module, linears: Dict[str, nn.Module], inputs: BlockInputs, targets: List[torch.Tensor],
                      epochs: int, lr: float, seed: int = 0, outputs: Optional[List[torch.Tensor]] = None):
    """Refit the kept weights of ``linears`` (masks fixed) so that ``block(inputs) ~= targets``.

    Adam on the relative squared error, one calibration batch per step, ``epochs`` passes in a seeded
    order. Pruned weights get no gradient and are re-zeroed after every step, so masks stay exact.
    ``outputs`` are the block's outputs before the refit (for the "before" loss, saving a pass).
    Returns ``(loss_before, loss_after, new_outputs)``.
    """
    weights = [m.weight for m in linears.values()]
    masks = [w != 0 for w in weights]
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.Adam(weights, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            if outputs is None:
                outputs = [inputs.call(block, b) for b in range(len(inputs))]
            before = sum(float(_rel_err(o, t)) for o, t in zip(outputs, targets)) / len(inputs)
        with torch.enable_grad():
            for _ in range(epochs):
                for b in torch.randperm(len(inputs), generator=gen).tolist():
                    loss = _rel_err(inputs.call(block, b), targets[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for w, m in zip(weights, masks):
                        w.grad.mul_(m)
                    opt.step()
                    with torch.no_grad():
                        for w, m in zip(weights, masks):
                            w.mul_(m)
        with torch.no_grad():
            new = [inputs.call(block, b) for b in range(len(inputs))]
            after = sum(float(_rel_err(o, t)) for o, t in zip(new, targets)) / len(inputs)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
    return before, after, new


def _block_sparsity(linears: Dict[str, nn.Module]) -> float:
    z = sum(m.weight.numel() - int(torch.count_nonzero(m.weight)) for m in linears.values())
    n = sum(m.weight.numel() for m in linears.values())
    return z / n if n else 0.0


class _Loop(BlockLoop):
    """The shared block loop plus the block-level refinements a config may ask for (see the module
    docstring) and the block transforms that run before a block's statistics."""

    def __init__(self, *args, cfg, result: LinearPass, block_entry, transforms: Sequence = (), **kw):
        super().__init__(*args, **kw)
        self.cfg, self.result, self.block_entry, self.transforms = cfg, result, block_entry, list(transforms)

    def dense_outputs(self, bidx, block, dense):
        if dense is not None and not (getattr(self.cfg, "error_correction", False)
                                      or getattr(self.cfg, "dense_stats", False)):
            return block_outputs(block, dense)  # regression targets only, before any hook exists
        return None

    def before_statistics(self, bidx, block, inputs):
        for t in self.transforms:  # e.g. AWQ: scales searched on the block's inputs, folded in, before the Hessians
            info = t.transform_block(bidx, block, inputs, self.targets.per_block[bidx])
            if info:
                self.result.transforms.append({"block": bidx, "transform": t.name, **info})

    def before_block(self, bidx, block, inputs, dense, collector: StatsCollector, dense_outs):
        if dense is not None and dense_outs is None:  # the dense block's outputs, before pruning, with either
            # its linears' inputs recorded (error correction) or statistics accumulated on them (dense_stats:
            # each linear's statistics then cover its inputs in the dense model *and*, in the pass that
            # follows, in the pruned model, over the same calibration windows)
            ec = bool(getattr(self.cfg, "error_correction", False))
            collector.record = ec
            dense_outs = collector.forward_all(block, dense)
            if ec:
                collector.record = False
                collector.dense_inputs = collector.recorded
        return dense_outs

    def after_single_pass(self, bidx, block, inputs, outputs, dense_outputs, collector: StatsCollector):
        epochs = getattr(self.cfg, "reconstruct_epochs", 0)
        if not epochs:
            return outputs
        collector.remove()
        collector.stats.clear()
        linears = self.targets.per_block[bidx]
        loss0, loss1, outputs = reconstruct_block(block, linears, inputs, dense_outputs, epochs,
                                                  self.cfg.reconstruct_lr, seed=bidx, outputs=outputs)
        self.result.reconstruction.append({"block": bidx, "loss_before": loss0, "loss_after": loss1})
        return outputs

    def after_block(self, bidx, linears, t0):
        super().after_block(bidx, linears, t0)
        self.block_entry(bidx, linears, t0)

    def state_of(self, bidx):
        r = self.result
        names = {m["name"] for m in r.modules if m["block"] == bidx}
        full = dict(zip(self.targets.flat(), self.targets.qualified_names()))
        tensors = {}
        for key in names:
            if full[key] in r.params:
                scale, zero = r.params[full[key]]
                tensors[f"scale.{full[key]}"] = scale
                if zero is not None:
                    tensors[f"zero.{full[key]}"] = zero
        state = {"modules": [m for m in r.modules if m["block"] == bidx],
                 "blocks": [b for b in r.blocks if b["block"] == bidx],
                 "reconstruction": [x for x in r.reconstruction if x["block"] == bidx],
                 "transforms": [x for x in r.transforms if x["block"] == bidx],
                 "spec": list(dataclasses.astuple(r.spec)) if r.spec is not None else None}
        return state, tensors

    def restore(self, bidx, state, tensors):
        r = self.result
        r.modules += state["modules"]
        r.blocks += state["blocks"]
        r.reconstruction += state["reconstruction"]
        r.transforms += state["transforms"]
        if state.get("spec") is not None:
            r.spec = GridSpec(*state["spec"])
        for k, v in tensors.items():
            if k.startswith("scale."):
                name = k[len("scale."):]
                r.params[name] = (v, tensors.get(f"zero.{name}"))


@torch.no_grad()
def linear_pass(model: nn.Module, method: LinearMethod, cfg, targets: Targets, calib_ids: Optional[torch.Tensor],
                *, sparsities: Optional[List[float]] = None, nm=None, batch_size: int = 1, device=None,
                transforms: Sequence = (), progress: bool = True, desc: str = "compress", stage: str = "",
                on_block: Optional[Callable[[int], None]] = None, checkpoints=None, store=None,
                check_pattern=None) -> LinearPass:
    """Compress every target linear with ``method`` (see the module docstring). ``sparsities``: the target
    of each block (mask methods); ``nm``: the N:M pattern; ``cfg``: the method's config (loop settings and
    refinements are read from it when present); ``transforms``: block transforms run before each block's
    statistics (they need the calibration loop); ``checkpoints``: a
    :class:`~compress.calibration.checkpoint.BlockCheckpoints` the walk checkpoints every block into and
    resumes from; ``store``: where the blocks live between turns (None: in the model; a
    :class:`~compress.calibration.onload.DiskBlocks` for a model on the meta device). Each entry says
    whether the linear's zeros from before survived (``zeros_before``, ``zeros_kept``; with
    ``check_pattern`` (N, M) also ``nm_kept``) and, when quantized, whether every weight lies on its grid
    (``on_grid``): checked while the block is loaded, so nothing of the whole model is held for the checks."""
    result = LinearPass()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    full = dict(zip(targets.flat(), targets.qualified_names()))
    nblocks = len(targets.per_block)
    sparsities = sparsities if sparsities is not None else [0.0] * nblocks
    method.prepare(targets, sparsities)

    def compute_linear(bidx: int, name: str, mod: nn.Module, stats: Optional[InputStats]) -> LinearResult:
        """The method's step for one linear (what a rank computes for the linears it owns)."""
        t0 = time.perf_counter()
        key = f"{bidx}.{name}"
        w_dense = weight_matrix(mod).detach()
        keep = keep_mask(w_dense) if method.preserves_zeros else None
        res: LinearResult = method.step(w_dense, stats, LinearJob(key, bidx, sparsities[bidx], nm, keep))
        res.info = dict(res.info, step_seconds=round(time.perf_counter() - t0, 4))
        res.kept_zeros = keep is not None
        return res

    def apply_linear(bidx: int, name: str, mod: nn.Module, stats: Optional[InputStats], res: LinearResult):
        """Write the new weight into the model and record the linear's entry (every rank, same result)."""
        t0 = time.perf_counter()
        key = f"{bidx}.{name}"
        w = weight_matrix(mod)  # [out, in], a view of the stored weight (Conv1D stores it transposed)
        w_dense = w.detach()
        zmask = w_dense == 0
        nz_before = int(zmask.sum())
        # the error before the copy: w_dense may be the stored weight itself
        err = stats.relative_error(w_dense, res.weight) if stats is not None else None
        info = method.info(stats) if stats is not None else {}
        w.data.copy_(res.weight.to(w_dense.dtype))
        zeros = w.numel() - int(torch.count_nonzero(w))
        entry = {"block": bidx, "name": key, "type": type(mod).__name__, "rows": w.shape[0], "cols": w.shape[1],
                 "numel": w.numel(), "zeros": zeros, "achieved": zeros / w.numel(), "rel_error": err, **info,
                 **{k: v for k, v in res.info.items() if k != "step_seconds"}}
        if method.kind == "prune" or getattr(cfg, "sparsity", None) is not None:
            entry["target"] = 1 - nm[0] / nm[1] if nm else sparsities[bidx]
        if nm:
            entry["nm_ok"] = check_nm(w, *nm)
        if nz_before > SPARSE_MIN * w.numel():  # it had real zeros: were they kept?
            entry["zeros_before"] = nz_before
            entry["zeros_kept"] = not bool((w[zmask] != 0).any())
            if check_pattern:
                entry["nm_kept"] = check_nm(w, *check_pattern)
        del zmask
        if res.spec is not None:
            result.spec = res.spec
            result.params[full[key]] = (res.scale.cpu(), None if res.zero is None else res.zero.cpu())
            entry["bits_per_weight"] = bits_per_weight(res.spec, w.shape[1])
            entry["on_grid"] = on_grid(w, res.scale, res.zero, res.spec)
            entry["kept_zeros"] = bool(getattr(res, "kept_zeros", False))
        entry["seconds"] = round(res.info.get("step_seconds", 0.0) + time.perf_counter() - t0, 4)
        result.modules.append(entry)

    def compress_linear(bidx: int, name: str, mod: nn.Module, stats: Optional[InputStats]):
        apply_linear(bidx, name, mod, stats, compute_linear(bidx, name, mod, stats))

    def block_entry(bidx, linears, t0):
        mods = [m for m in result.modules if m["block"] == bidx]
        errs = [m["rel_error"] for m in mods if m["rel_error"] is not None]
        result.blocks.append({"block": bidx, "target_sparsity": sparsities[bidx],
                              "achieved_sparsity": _block_sparsity(linears),
                              "mean_rel_error": sum(errs) / len(errs) if errs else None,
                              "seconds": round(time.perf_counter() - t0, 3), "peak_memory_mb": rss_peak_mb()})
        if on_block is not None:
            on_block(bidx)

    if not method.needs_calibration and not transforms:
        blocks = find_blocks(model)[1]
        for bidx, linears in enumerate(targets.per_block):
            t0 = time.perf_counter()
            if store is not None:
                store.onload(bidx, blocks[bidx], device)
            for name, mod in linears.items():
                compress_linear(bidx, name, mod, None)
            block_entry(bidx, linears, t0)
            if store is not None:
                store.finished(bidx, blocks[bidx])
                store.release(bidx, blocks[bidx])
        return result

    dense_stream = bool(getattr(cfg, "error_correction", False) or getattr(cfg, "reconstruct_epochs", 0)
                        or getattr(cfg, "dense_stats", False))
    propagate = getattr(cfg, "propagate", "pruned")
    forced = cfg.needs_single_pass() if hasattr(cfg, "needs_single_pass") else ""
    loop = _Loop(model, targets, method, compress_linear, cfg=cfg, result=result, block_entry=block_entry,
                 transforms=transforms, sequential=getattr(cfg, "sequential", "auto"),
                 memory_budget=getattr(cfg, "memory_budget", 0.5), device=device, offload=getattr(cfg, "offload", False),
                 propagate=propagate, batch_size=batch_size, dense_stream=dense_stream, forced=forced,
                 two_pass_reason=f"{cfg.key('propagate')}=dense needs two passes" if propagate == "dense" else "",
                 progress=progress, desc=desc, stage=stage, checkpoints=checkpoints, store=store)
    loop.compute_linear, loop.apply_linear = compute_linear, apply_linear  # ranks split the linears between them
    t_cal = time.perf_counter()
    result.mode = loop.run(calib_ids)
    result.calib_seconds = time.perf_counter() - t_cal
    result.walk = loop.walk
    return result

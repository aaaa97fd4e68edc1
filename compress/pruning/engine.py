"""The prune stage: targets, sparsity schedule, the per-block loop and the report.

Two block-processing modes share the sequential calibration pipeline:

* ``sequential=False`` (the reference behaviour): one forward of the block over all calibration
  batches collects the statistics of every target linear on the block's (dense) internal inputs
  (each batch after the first stops once it has fed every target linear), then all linears are
  pruned, then a second forward produces the outputs for the next block.
* ``sequential=True``: one forward only. Each calibration batch runs in its own greenlet; every
  target linear's pre-hook records the batch's input and pauses. When all batches wait at the same
  linear its statistics are complete, it is pruned, and the batches resume *through the pruned
  linear*. So each linear sees the already-pruned inputs of the linears before it (better), and the
  block's outputs come out of the same pass (faster), while batches keep their small, cache-friendly
  size.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from compress.calibration import BlockInputs, BlockResult, block_outputs, find_blocks, run_sequential
from compress.config import CalibConfig, PruneConfig, parse_pattern
from compress.pruning.masks import check_nm
from compress.pruning.methods import InputStats, PruningMethod, get_method
from compress.pruning.schedule import layer_sparsities
from compress.record import _rss_peak_mb, proc_kb

log = logging.getLogger(__name__)


def target_linears(block: nn.Module, cfg: PruneConfig) -> Dict[str, nn.Linear]:
    """Linear modules of a block whose names match ``targets`` and none of ``ignore``."""
    out = {}
    for name, mod in block.named_modules():
        if not isinstance(mod, nn.Linear) or not name:
            continue
        if not any(re.search(rx, name) for rx in cfg.targets):
            continue
        if any(re.search(rx, name) for rx in cfg.ignore):
            continue
        out[name] = mod
    return out


def single_pass_inflight_mb(model: nn.Module, ntokens: int) -> Optional[float]:
    """About what the single pass (``sequential=true``) holds beyond the reference mode: every calibration
    sample waits inside the block at each pruning point, so at the MLP's down projection each token
    keeps its residual stream, its normalised input and the MLP intermediate
    (``2 * hidden + intermediate`` values). Measured on SmolLM2-135M, 32 x 512 tokens: ~200 MiB of
    heap against this estimate's 172. None when the config names no hidden size."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(cfg, "hidden_size", None)
    if not hidden:
        return None
    inter = next((getattr(cfg, k) for k in ("intermediate_size", "ffn_dim", "n_inner") if getattr(cfg, k, None)),
                 4 * hidden)
    nbytes = next(model.parameters()).element_size()
    return ntokens * (2 * hidden + inter) * nbytes / 2**20


def _free_memory_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    kb = proc_kb("/proc/meminfo", "MemAvailable")
    return kb / 1024 if kb is not None else None


@dataclass
class PruneReport:
    method: str
    pattern: str
    target_sparsity: float
    modules: List[Dict] = field(default_factory=list)
    blocks: List[Dict] = field(default_factory=list)
    calibration: Dict = field(default_factory=dict)
    layer_sparsities: Optional[List[float]] = None
    seconds: float = 0.0
    calib_seconds: float = 0.0
    blocks_reconstruction: List[Dict] = field(default_factory=list)

    def achieved(self) -> float:
        total = sum(m["numel"] for m in self.modules)
        zeros = sum(m["zeros"] for m in self.modules)
        return zeros / total if total else 0.0

    def summary(self) -> Dict:
        errs = [m["rel_error"] for m in self.modules if m.get("rel_error") is not None]
        out = {"target_sparsity": self.target_sparsity, "achieved_sparsity": self.achieved(), "pattern": self.pattern,
               "modules": len(self.modules), "prune_seconds": round(self.seconds, 3),
               "mean_rel_error": sum(errs) / len(errs) if errs else None}
        if self.pattern != "unstructured":
            out["nm_exact"] = all(m.get("nm_ok", True) for m in self.modules)
        return out

    def to_dict(self) -> Dict:
        return {"summary": self.summary(), "layer_sparsities": self.layer_sparsities, "blocks": self.blocks,
                "reconstruction": self.blocks_reconstruction,
                "modules": self.modules, "calibration": self.calibration}

    def table(self, max_rows: int = 12) -> str:
        lines = [f"prune: {self.method} {self.pattern} target={self.target_sparsity:.3f} "
                 f"achieved={self.achieved():.4f} in {self.seconds:.1f}s",
                 f"  {'block':>5} {'sparsity':>9} {'mean rel err':>13} {'seconds':>8} {'peak MiB':>9}"]
        step = max(1, len(self.blocks) // max_rows)
        for b in self.blocks[::step]:
            err = f"{b['mean_rel_error']:.4f}" if b.get("mean_rel_error") is not None else "-"
            lines.append(f"  {b['block']:>5} {b['achieved_sparsity']:>9.4f} {err:>13} {b['seconds']:>8.2f} "
                         f"{b['peak_memory_mb']:>9.0f}")
        return "\n".join(lines)


class _StatisticsComplete(Exception):
    """Raised by a statistics hook once the current batch has fed every target linear."""


class _Collector:
    """Pre-hooks on the target linears of one block that feed :class:`InputStats`.

    Linears receiving the same tensor object within one batch share one ``InputStats``.
    """

    def __init__(self, linears: Dict[str, nn.Linear], method: PruningMethod, device):
        self.linears = linears
        self.method = method
        self.device = device
        self.stats: Dict[str, InputStats] = {}
        self.current = 0  # batch key, set by the runner
        self._seen: Dict[object, Dict[int, tuple]] = {}
        self.order: List[str] = []  # forward order of first calls
        self.on_input = None  # sequential mode: called after the input was recorded
        self.dense_inputs: Optional[Dict[str, List[torch.Tensor]]] = None  # error correction: X_dense per batch
        self.record = False  # record mode: store inputs per batch instead of accumulating statistics
        self.recorded: Dict[str, List[torch.Tensor]] = {}
        self.stop_when_complete = False  # collect_all: stop a batch once it has fed every target linear
        self._calls: Dict[object, Dict[str, int]] = {}  # per batch: hook calls per linear
        self.handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in linears.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            seen = self._seen.setdefault(self.current, {})
            hit = seen.get(id(x))
            shared = hit is not None and hit[0] is x
            if self.record:  # dense pass for error correction: keep each distinct input once
                if shared:
                    self.recorded[name] = self.recorded[hit[1]]
                else:
                    seen[id(x)] = (x, name)
                    self.recorded.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).clone())
                return None
            if name not in self.stats:
                if shared:
                    self.stats[name] = self.stats[hit[1]]
                else:
                    self.stats[name] = InputStats(x.shape[-1], self.method.needs_hessian, self.method.needs_sqnorm,
                                                  device=self.device)
                self.order.append(name)
            if not shared:
                seen[id(x)] = (x, name)
                xd = self.dense_inputs[name][self.current] if self.dense_inputs is not None else None
                self.stats[name].add(x, xd)
            if self.on_input is not None:
                self.on_input(name)
            calls = self._calls.setdefault(self.current, {})
            calls[name] = calls.get(name, 0) + 1
            if self.stop_when_complete and len(calls) == len(self.linears):
                raise _StatisticsComplete
            return None
        return hook

    def end_batch(self, key):
        self._seen.pop(key, None)
        self._calls.pop(key, None)

    def forward_all(self, block: nn.Module, inputs: BlockInputs) -> List[torch.Tensor]:
        """Run every batch through ``block`` with the hooks live (statistics or recording)."""
        outs = []
        for b in range(len(inputs)):
            self.current = b
            outs.append(inputs.call(block, b))
            self.end_batch(b)
        return outs

    def collect_all(self, block: nn.Module, inputs: BlockInputs) -> None:
        """Statistics only, outputs not wanted: after the first batch has shown that every target linear
        is called exactly once per forward, each later batch stops as soon as it has fed all of them
        (the rest of the block, e.g. the down projection and what follows it, is skipped). Blocks that
        call a target linear more or less than once (shared or routed modules) run in full."""
        self.current = 0
        inputs.call(block, 0)
        calls = self._calls.get(0, {})
        self.end_batch(0)
        self.stop_when_complete = len(calls) == len(self.linears) and all(c == 1 for c in calls.values())
        try:
            for b in range(1, len(inputs)):
                self.current = b
                try:
                    inputs.call(block, b)
                except _StatisticsComplete:
                    pass
                self.end_batch(b)
        finally:
            self.stop_when_complete = False

    def remove(self):
        for h in self.handles:
            h.remove()
        self._seen.clear()


def _run_greenlets(block: nn.Module, inputs: BlockInputs, collector: _Collector, prune_fn) -> List[torch.Tensor]:
    """One forward of all batches in lock-step; prune each linear once every batch has fed it."""
    import greenlet

    main = greenlet.getcurrent()
    outs: List[Optional[torch.Tensor]] = [None] * len(inputs)
    waiting: Dict[int, str] = {}

    def pause(name):
        main.switch(name)

    collector.on_input = pause

    def body(b):
        def run():
            with torch.no_grad():
                outs[b] = inputs.call(block, b)
            return None
        return run

    lets = [greenlet.greenlet(body(b)) for b in range(len(inputs))]
    pending = set(range(len(inputs)))
    while pending:
        waiting.clear()
        for b in sorted(pending):
            collector.current = b
            name = lets[b].switch()
            if lets[b].dead:
                collector.end_batch(b)
                pending.discard(b)
            else:
                waiting[b] = name
        if not waiting:
            break
        names = set(waiting.values())
        if len(names) != 1:
            raise RuntimeError(f"sequential pruning: batches diverged at {sorted(names)}; use prune.sequential=false")
        prune_fn(names.pop())
    collector.on_input = None
    return outs  # type: ignore[return-value]


def _rel_err(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() - target.float()).square().sum() / target.float().square().sum().clamp_min(1e-12)


def reconstruct_block(block: nn.Module, linears: Dict[str, nn.Linear], inputs: BlockInputs, targets: List[torch.Tensor],
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


def _block_sparsity(linears: Dict[str, nn.Linear]) -> float:
    z = sum(int((m.weight == 0).sum()) for m in linears.values())
    n = sum(m.weight.numel() for m in linears.values())
    return z / n if n else 0.0


@torch.no_grad()
def prune_model(model: nn.Module, tokenizer, cfg: PruneConfig, calib: Optional[CalibConfig] = None, device=None,
                calib_ids: Optional[torch.Tensor] = None, progress: bool = True) -> PruneReport:
    """Prune ``model`` in place according to ``cfg`` and return the report."""
    t_start = time.perf_counter()
    calib = calib or CalibConfig()
    nm = parse_pattern(cfg.pattern)
    method = get_method(cfg.method, cfg)
    _, blocks = find_blocks(model)
    nblocks = len(blocks)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    target = 1 - nm[0] / nm[1] if nm else float(cfg.sparsity)
    report = PruneReport(cfg.method, cfg.pattern, target)

    needs_calib = method.needs_calibration or cfg.schedule == "owl"
    if needs_calib and calib_ids is None:
        from compress.data import load_calibration

        calib_ids, report.calibration = load_calibration(tokenizer, calib.source, calib.nsamples, calib.seqlen,
                                                         calib.seed, calib.text_field)
    elif calib_ids is not None:
        report.calibration = {"nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), "given": True}

    if cfg.sequential and method.needs_calibration:
        est = single_pass_inflight_mb(model, int(calib_ids.numel()))
        report.calibration["single_pass_inflight_estimate_mb"] = est
        free = _free_memory_mb(device)
        if est is not None and free is not None and est > 0.5 * free:
            log.warning("prune.sequential=true keeps every calibration sample inside the block: about %.0f MiB "
                        "on %s, where %.0f MiB are free. prune.sequential=false (two passes) needs only one "
                        "sample's activations.", est, device, free)

    sparsities = layer_sparsities(cfg, nblocks, model=model, calib_ids=calib_ids, batch_size=calib.batch_size,
                                  device=device, offload=cfg.offload, progress=progress)
    report.layer_sparsities = sparsities if cfg.schedule != "uniform" else None

    def prune_linear(bidx: int, name: str, mod: nn.Linear, stats: Optional[InputStats], sparsity: float,
                     thresh: Optional[float] = None):
        t0 = time.perf_counter()
        w_dense = mod.weight.data
        if thresh is not None:  # global magnitude
            new = w_dense.float() * (w_dense.float().abs() > thresh)
        else:
            new = method.prune_weight(w_dense, stats, sparsity, nm)
        err = stats.relative_error(w_dense, new) if stats is not None else None
        mod.weight.data.copy_(new.to(w_dense.dtype))
        zeros = int((mod.weight == 0).sum())
        entry = {"block": bidx, "name": f"{bidx}.{name}", "target": 1 - nm[0] / nm[1] if nm else sparsity,
                 "achieved": zeros / mod.weight.numel(), "zeros": zeros, "numel": mod.weight.numel(),
                 "rel_error": err, "seconds": round(time.perf_counter() - t0, 4)}
        if nm:
            entry["nm_ok"] = check_nm(mod.weight, *nm)
        report.modules.append(entry)

    def block_entry(bidx, linears, t0):
        mods = [m for m in report.modules if m["block"] == bidx]
        errs = [m["rel_error"] for m in mods if m["rel_error"] is not None]
        report.blocks.append({"block": bidx, "target_sparsity": sparsities[bidx],
                              "achieved_sparsity": _block_sparsity(linears),
                              "mean_rel_error": sum(errs) / len(errs) if errs else None,
                              "seconds": round(time.perf_counter() - t0, 3), "peak_memory_mb": _rss_peak_mb()})

    if not method.needs_calibration:
        thresh = None
        if cfg.scope == "global":
            allw = torch.cat([m.weight.detach().abs().flatten().float().cpu()
                              for b in blocks for m in target_linears(b, cfg).values()])
            k = int(allw.numel() * target)
            thresh = float(torch.kthvalue(allw, k).values) if k else -1.0
            del allw
        for bidx, block in enumerate(blocks):
            t0 = time.perf_counter()
            linears = target_linears(block, cfg)
            for name, mod in linears.items():
                prune_linear(bidx, name, mod, None, sparsities[bidx], thresh)
            block_entry(bidx, linears, t0)
        report.seconds = time.perf_counter() - t_start
        return report

    def process_block(bidx: int, block: nn.Module, inputs: BlockInputs, dense: Optional[BlockInputs]):
        t0 = time.perf_counter()
        linears = target_linears(block, cfg)
        dense_outs = None
        if dense is not None and not (cfg.error_correction or cfg.dense_stats):
            dense_outs = block_outputs(block, dense)  # regression targets only, before any hook exists
        collector = _Collector(linears, method, device)
        try:
            if dense is not None and dense_outs is None:  # the dense block's outputs, before pruning, with
                # either its linears' inputs recorded (error correction) or statistics accumulated on them
                # (dense_stats: each linear's statistics then cover its inputs in the dense model *and*, in
                # the pass below, in the pruned model, over the same calibration windows)
                collector.record = cfg.error_correction
                dense_outs = collector.forward_all(block, dense)
                if cfg.error_correction:
                    collector.record = False
                    collector.dense_inputs = collector.recorded
            if cfg.sequential:
                def prune_now(name):
                    prune_linear(bidx, name, linears[name], collector.stats[name], sparsities[bidx])
                outs = _run_greenlets(block, inputs, collector, prune_now)
                if cfg.reconstruct_epochs:
                    collector.remove()
                    collector.stats.clear()
                    loss0, loss1, outs = reconstruct_block(block, linears, inputs, dense_outs, cfg.reconstruct_epochs,
                                                           cfg.reconstruct_lr, seed=bidx, outputs=outs)
                    report.blocks_reconstruction.append({"block": bidx, "loss_before": loss0, "loss_after": loss1})
                result = BlockResult(outputs=outs, dense_outputs=dense_outs)
            else:  # statistics pass, prune all; the pipeline then runs the pruned block for the outputs,
                # except with propagate=dense, where the outputs before pruning are the ones to propagate
                result = None
                if cfg.propagate == "dense":
                    result = BlockResult(dense_outputs=collector.forward_all(block, inputs))
                else:
                    collector.collect_all(block, inputs)  # stops each batch after the last linear
                for name in collector.order:
                    prune_linear(bidx, name, linears[name], collector.stats[name], sparsities[bidx])
        finally:
            collector.remove()
        block_entry(bidx, linears, t0)
        return result

    propagate = cfg.propagate
    t_cal = time.perf_counter()
    run_sequential(model, calib_ids, process_block, batch_size=calib.batch_size, device=device,
                   offload=cfg.offload, propagate=propagate,
                   dense_stream=cfg.error_correction or cfg.reconstruct_epochs > 0 or cfg.dense_stats, progress=progress,
                   desc=f"prune {cfg.method}")
    report.calib_seconds = time.perf_counter() - t_cal
    report.seconds = time.perf_counter() - t_start
    return report

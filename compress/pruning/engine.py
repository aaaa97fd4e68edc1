"""The prune stage: targets, sparsity schedule, the per-block loop, the mode decision and the report.

Two block-processing modes share the sequential calibration pipeline (``compress.calibration``):

* two passes (``prune.sequential=false``, the reference behaviour): one forward of the block over all
  calibration batches collects the statistics of every target linear on the block's (dense) internal
  inputs (each batch after the first stops once it has fed every target linear), then all linears are
  pruned, then a second forward produces the outputs for the next block.
* single pass (``prune.sequential=true``): one forward only. Each calibration batch runs in its own
  greenlet; every target linear's pre-hook records the batch's input and pauses. When all batches wait
  at the same linear its statistics are complete, it is pruned, and the batches resume *through the
  pruned linear*. So each linear sees the already-pruned inputs of the linears before it (better), and
  the block's outputs come out of the same pass (about half the reference loop's time), but every
  calibration sample waits inside the block.
* ``prune.sequential=auto`` (the default) estimates both modes' peak memory on the first block
  (``compress.calibration.memory``) and takes the single pass when it fits ``prune.memory_budget`` x the
  free memory of the device that holds the activations, else two passes. The choice, the estimates and
  the budget go into the report.

The stage never succeeds silently: a model whose selected modules cannot be pruned, or a target set
that selects nothing, is refused before any work; a run that pruned fewer modules, or less, than it
targeted fails after it with :class:`~compress.errors.ShortfallError`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from compress.calibration import BlockInputs, Targets, block_outputs, resolve_targets, weight_matrix
from compress.calibration.loop import BlockLoop, mode_line
from compress.calibration.stats import InputStats, StatsCollector
from compress.config import CalibConfig, PruneConfig, parse_pattern
from compress.errors import ShortfallError
from compress.pruning.masks import check_nm
from compress.pruning.methods import PruningMethod, get_method
from compress.pruning.schedule import layer_sparsities
from compress.record import _rss_peak_mb

log = logging.getLogger(__name__)


def prune_targets(model: nn.Module, cfg: PruneConfig) -> Targets:
    """The modules ``cfg`` selects (``prune.targets`` / ``prune.ignore``), through the one resolver."""
    return resolve_targets(model, cfg.targets, cfg.ignore)


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
    mode: Dict = field(default_factory=dict)  # the block mode: chosen, why, memory estimates and budget
    targets: Dict = field(default_factory=dict)  # what the resolver selected
    check: Dict = field(default_factory=dict)  # verify(): every target pruned to its target
    joint_quant: Optional[object] = field(default=None, repr=False)  # quant.joint: the QuantReport of the same loop

    def verify(self, expected: List[str], describe: str, global_scope: bool = False) -> Dict:
        """Every one of the ``expected`` targeted modules (``"<block>.<name>"``) pruned, each to its target
        (N:M exact), and the whole near the target. Records the check; raises :class:`ShortfallError`
        if it fails."""
        nm = parse_pattern(self.pattern)
        short = []
        for m in self.modules:
            if nm is not None:
                ok = m.get("nm_ok", False) and m["zeros"] >= m["rows"] * (m["cols"] // nm[1]) * (nm[1] - nm[0])
            elif global_scope:
                ok = True
            else:  # rounding: a mask removes round(cols * s) per row at worst
                ok = m["achieved"] >= m["target"] - 1.0 / m["cols"] - 1e-9
            if not ok:
                short.append(f"{m['name']} {m['achieved']:.4f} < {m['target']:.4f}")
        total = sum(m["numel"] for m in self.modules)
        wanted = sum(m["target"] * m["numel"] for m in self.modules) / total if total else 0.0
        self.check = {"targeted_modules": len(expected), "pruned_modules": len(self.modules),
                      "short_modules": len(short), "target": wanted, "achieved": self.achieved(), "ok": False}
        problems = []
        done = {m["name"] for m in self.modules}
        missing = [n for n in expected if n not in done]
        if missing or len(done) != len(expected):
            problems.append(f"pruned {len(done)} of the {len(expected)} targeted modules"
                            + (f" (never reached by the calibration forward: {missing[:6]})" if missing else ""))
        if short:
            problems.append(f"{len(short)} modules below their target: " + "; ".join(short[:5]))
        if total and nm is None and self.achieved() < wanted - 0.02:  # N:M is checked exactly per module above
            problems.append(f"achieved sparsity {self.achieved():.4f} against a target of {wanted:.4f}")
        self.check["ok"] = not problems
        if problems:
            raise ShortfallError(f"prune: {describe}: " + "; ".join(problems), report=self)
        return self.check

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
        return {"summary": self.summary(), "mode": self.mode, "targets": self.targets, "check": self.check,
                "layer_sparsities": self.layer_sparsities, "blocks": self.blocks,
                "reconstruction": self.blocks_reconstruction, "modules": self.modules, "calibration": self.calibration}

    def table(self, max_rows: int = 12) -> str:
        lines = [f"prune: {self.method} {self.pattern} target={self.target_sparsity:.3f} "
                 f"achieved={self.achieved():.4f} in {self.seconds:.1f}s, {len(self.modules)} modules"]
        if self.mode:
            lines.append("  " + mode_line(self.mode, "prune"))
        lines += [
                 f"  {'block':>5} {'sparsity':>9} {'mean rel err':>13} {'seconds':>8} {'peak MiB':>9}"]
        step = max(1, len(self.blocks) // max_rows)
        for b in self.blocks[::step]:
            err = f"{b['mean_rel_error']:.4f}" if b.get("mean_rel_error") is not None else "-"
            lines.append(f"  {b['block']:>5} {b['achieved_sparsity']:>9.4f} {err:>13} {b['seconds']:>8.2f} "
                         f"{b['peak_memory_mb']:>9.0f}")
        return "\n".join(lines)


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


def _block_sparsity(linears: Dict[str, nn.Module]) -> float:
    z = sum(m.weight.numel() - int(torch.count_nonzero(m.weight)) for m in linears.values())
    n = sum(m.weight.numel() for m in linears.values())
    return z / n if n else 0.0


@torch.no_grad()
def prune_model(model: nn.Module, tokenizer, cfg: PruneConfig, calib: Optional[CalibConfig] = None, device=None,
                calib_ids: Optional[torch.Tensor] = None, progress: bool = True, verify: bool = True,
                quant=None) -> PruneReport:
    """Prune ``model`` in place according to ``cfg`` and return the report.

    ``quant``: a :class:`~compress.config.QuantConfig` for the joint one-pass mode (SparseGPT only): each
    linear's mask is chosen and its kept weights quantized in the same column loop; the
    :class:`~compress.quant.engine.QuantReport` is ``report.joint_quant``.

    Refuses (:class:`~compress.errors.UnsupportedModelError`) before any work when the selected modules
    include some it cannot prune or when nothing is selected; with ``verify`` raises
    :class:`~compress.errors.ShortfallError` (carrying the report) when fewer modules, or less, than
    targeted were pruned.
    """
    t_start = time.perf_counter()
    calib = calib or CalibConfig()
    nm = parse_pattern(cfg.pattern)
    method = get_method(cfg.method, cfg)
    targets = prune_targets(model, cfg).require("prune")
    nblocks = len(targets.per_block)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    target = 1 - nm[0] / nm[1] if nm else float(cfg.sparsity)
    report = PruneReport(cfg.method, cfg.pattern, target)
    report.targets = {"model_class": targets.model_class, "blocks": targets.blocks_name, "targets": list(targets.patterns),
                      "ignore": list(targets.ignore), "modules": len(targets),
                      "per_block": [list(b) for b in targets.per_block[:1]]}

    needs_calib = method.needs_calibration or cfg.schedule == "owl"
    if needs_calib and calib_ids is None:
        from compress.data import load_calibration

        calib_ids, report.calibration = load_calibration(tokenizer, calib.source, calib.nsamples, calib.seqlen,
                                                         calib.seed, calib.text_field)
    elif calib_ids is not None:
        report.calibration = {"nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), "given": True}

    sparsities = layer_sparsities(cfg, nblocks, model=model, calib_ids=calib_ids, batch_size=calib.batch_size,
                                  device=device, offload=cfg.offload, progress=progress)
    report.layer_sparsities = sparsities if cfg.schedule != "uniform" else None

    joint = spec = full = None
    if quant is not None:
        from compress.quant.engine import QuantReport, record_module
        from compress.quant.methods import grid_spec

        if not hasattr(method, "prune_and_quantize"):
            raise ValueError(f"the joint prune + quant mode needs prune.method=sparsegpt, not {cfg.method}")
        spec = grid_spec(quant)
        joint = report.joint_quant = QuantReport(quant.method, quant.bits, quant.group_size, quant.symmetric)
        joint.targets = report.targets
        full = dict(zip(targets.flat(), targets.qualified_names()))

    def prune_linear(bidx: int, name: str, mod: nn.Module, stats: Optional[InputStats], sparsity: float,
                     thresh: Optional[float] = None):
        t0 = time.perf_counter()
        w = weight_matrix(mod)  # [out, in], a view of the stored weight (Conv1D stores it transposed)
        w_dense = w.detach()
        if thresh is not None:  # global magnitude
            new = w_dense.float() * (w_dense.float().abs() > thresh)
        elif joint is not None:
            q = method.prune_and_quantize(w_dense, stats, sparsity, nm, quant, spec)
            new = q.weight
            record_module(joint, spec, f"{bidx}.{name}", full[f"{bidx}.{name}"], mod, w_dense.float(), q, stats,
                          kept_zeros=True, seconds=time.perf_counter() - t0)
        else:
            new = method.prune_weight(w_dense, stats, sparsity, nm)
        err = stats.relative_error(w_dense, new) if stats is not None else None
        info = method.info(stats) if stats is not None else {}
        w.data.copy_(new.to(w_dense.dtype))
        del new
        zeros = w.numel() - int(torch.count_nonzero(w))
        entry = {"block": bidx, "name": f"{bidx}.{name}", "type": type(mod).__name__, "rows": w.shape[0],
                 "cols": w.shape[1], "target": 1 - nm[0] / nm[1] if nm else sparsity,
                 "achieved": zeros / w.numel(), "zeros": zeros, "numel": w.numel(), "rel_error": err,
                 "seconds": round(time.perf_counter() - t0, 4), **info}
        if nm:
            entry["nm_ok"] = check_nm(w, *nm)
        report.modules.append(entry)

    def block_entry(bidx, linears, t0):
        mods = [m for m in report.modules if m["block"] == bidx]
        errs = [m["rel_error"] for m in mods if m["rel_error"] is not None]
        report.blocks.append({"block": bidx, "target_sparsity": sparsities[bidx],
                              "achieved_sparsity": _block_sparsity(linears),
                              "mean_rel_error": sum(errs) / len(errs) if errs else None,
                              "seconds": round(time.perf_counter() - t0, 3), "peak_memory_mb": _rss_peak_mb()})

    def finish():
        report.seconds = time.perf_counter() - t_start
        if verify:
            report.verify(list(targets.flat()), targets.describe(), global_scope=cfg.scope == "global")
        return report

    if not method.needs_calibration:
        thresh = None
        if cfg.scope == "global":
            allw = torch.cat([m.weight.detach().abs().flatten().float().cpu() for _, _, m in targets.items()])
            k = int(allw.numel() * target)
            thresh = float(torch.kthvalue(allw, k).values) if k else -1.0
            del allw
        for bidx, linears in enumerate(targets.per_block):
            t0 = time.perf_counter()
            for name, mod in linears.items():
                prune_linear(bidx, name, mod, None, sparsities[bidx], thresh)
            block_entry(bidx, linears, t0)
        return finish()

    dense_stream = cfg.error_correction or cfg.reconstruct_epochs > 0 or cfg.dense_stats
    loop = _PruneLoop(model, targets, method, lambda b, n, m, st: prune_linear(b, n, m, st, sparsities[b]),
                      cfg=cfg, report=report, block_entry=block_entry, sequential=cfg.sequential,
                      memory_budget=cfg.memory_budget, device=device, offload=cfg.offload, propagate=cfg.propagate,
                      batch_size=calib.batch_size, dense_stream=dense_stream, forced=cfg.needs_single_pass(),
                      two_pass_reason="prune.propagate=dense needs two passes" if cfg.propagate == "dense" else "",
                      progress=progress, desc=f"prune {cfg.method}", stage="prune")
    t_cal = time.perf_counter()
    report.mode = loop.run(calib_ids)
    report.calib_seconds = time.perf_counter() - t_cal
    if joint is not None:
        joint.mode = dict(report.mode, chosen="joint", block_mode=report.mode.get("chosen"),
                          reason="masks chosen and weights quantized in one column loop of the prune stage")
        joint.calibration = report.calibration
        joint.seconds = time.perf_counter() - t_start
    return finish()


class _PruneLoop(BlockLoop):
    """The shared block loop plus what pruning adds: the dense stream (regression targets, error
    correction's dense inputs, statistics on the dense inputs) and block reconstruction."""

    def __init__(self, *args, cfg: PruneConfig, report: PruneReport, block_entry, **kw):
        super().__init__(*args, **kw)
        self.cfg, self.report, self.block_entry = cfg, report, block_entry

    def dense_outputs(self, bidx, block, dense):
        if dense is not None and not (self.cfg.error_correction or self.cfg.dense_stats):
            return block_outputs(block, dense)  # regression targets only, before any hook exists
        return None

    def before_block(self, bidx, block, inputs, dense, collector: StatsCollector, dense_outs):
        if dense is not None and dense_outs is None:  # the dense block's outputs, before pruning, with either
            # its linears' inputs recorded (error correction) or statistics accumulated on them (dense_stats:
            # each linear's statistics then cover its inputs in the dense model *and*, in the pass that
            # follows, in the pruned model, over the same calibration windows)
            collector.record = self.cfg.error_correction
            dense_outs = collector.forward_all(block, dense)
            if self.cfg.error_correction:
                collector.record = False
                collector.dense_inputs = collector.recorded
        return dense_outs

    def after_single_pass(self, bidx, block, inputs, outputs, dense_outputs, collector: StatsCollector):
        if not self.cfg.reconstruct_epochs:
            return outputs
        collector.remove()
        collector.stats.clear()
        linears = self.targets.per_block[bidx]
        loss0, loss1, outputs = reconstruct_block(block, linears, inputs, dense_outputs, self.cfg.reconstruct_epochs,
                                                  self.cfg.reconstruct_lr, seed=bidx, outputs=outputs)
        self.report.blocks_reconstruction.append({"block": bidx, "loss_before": loss0, "loss_after": loss1})
        return outputs

    def after_block(self, bidx, linears, t0):
        super().after_block(bidx, linears, t0)
        self.block_entry(bidx, linears, t0)

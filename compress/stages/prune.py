"""The prune stage: a mask method over every target linear, the per-block sparsity schedule, the check and
the report.

Block modes (both through the shared block loop, :mod:`compress.calibration.loop`):

* two passes (``prune.sequential=false``, the reference behaviour): one forward of the block over all
  calibration batches collects the statistics of every target linear on the block's (dense) internal
  inputs, then all linears are pruned, then a second forward produces the outputs for the next block;
* single pass (``prune.sequential=true``): every calibration batch pauses at each target linear until all
  have reached it; it is pruned and the batches resume *through the pruned linear*, so each linear sees
  the already-pruned inputs of the linears before it, and the block's outputs come from the same pass;
* ``prune.sequential=auto`` (default) takes the single pass when its estimated peak memory fits
  ``prune.memory_budget`` x the free memory of the device holding the activations.

The stage never succeeds silently: a model whose selected modules cannot be pruned, or a target set that
selects nothing, is refused before any work; a run that pruned fewer modules, or less, than it targeted
fails after it with :class:`~compress.core.errors.ShortfallError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from compress.calibration.checkpoint import walk_checkpoints
from compress.calibration.loop import mode_line
from compress.calibration.targets import resolve_targets
from compress.core.config import parse_pattern
from compress.core.errors import ConfigError, ShortfallError
from compress.data import load_calibration
from compress.pruning.base import MaskConfig
from compress.pruning.schedule import layer_sparsities
from compress.registry import spec_of
from compress.schema import CalibConfig
from compress.stages.base import DiskSaver, PretrainedSaver, StageContext, StageResult
from compress.stages.engine import linear_pass


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
    walk: Dict = field(default_factory=dict)  # resumed_at (first block computed when resumed), checkpoint seconds

    def verify(self, expected: List[str], describe: str, global_scope: bool = False) -> Dict:
        """Every one of the ``expected`` targeted modules (``"<block>.<name>"``) pruned, each to its target
        (N:M exact), and the whole near the target. Records the check; raises :class:`ShortfallError`
        (carrying this report) if it fails."""
        self.check = verify_sparsity(self.modules, self.pattern, expected, global_scope)
        if not self.check["ok"]:
            raise ShortfallError(f"prune: {describe}: " + "; ".join(self.check["problems"]), result=self)
        return self.check

    def achieved(self) -> float:
        return achieved_sparsity(self.modules)

    def summary(self) -> Dict:
        errs = [m["rel_error"] for m in self.modules if m.get("rel_error") is not None]
        out = {"target_sparsity": self.target_sparsity, "achieved_sparsity": self.achieved(), "pattern": self.pattern,
               "modules": len(self.modules), "prune_seconds": round(self.seconds, 3),
               "mean_rel_error": sum(errs) / len(errs) if errs else None}
        if self.pattern != "unstructured":
            out["nm_exact"] = all(m.get("nm_ok", True) for m in self.modules)
        return out

    def to_dict(self) -> Dict:
        return {"summary": self.summary(), "mode": self.mode, "walk": self.walk, "targets": self.targets,
                "check": self.check,
                "layer_sparsities": self.layer_sparsities, "blocks": self.blocks,
                "reconstruction": self.blocks_reconstruction, "modules": self.modules, "calibration": self.calibration}

    def table(self, max_rows: int = 12) -> str:
        lines = [f"prune: {self.method} {self.pattern} target={self.target_sparsity:.3f} "
                 f"achieved={self.achieved():.4f} in {self.seconds:.1f}s, {len(self.modules)} modules"]
        if self.mode:
            lines.append("  " + mode_line(self.mode, "prune"))
        lines.append(f"  {'block':>5} {'sparsity':>9} {'mean rel err':>13} {'seconds':>8} {'peak MiB':>9}")
        step = max(1, len(self.blocks) // max_rows)
        for b in self.blocks[::step]:
            err = f"{b['mean_rel_error']:.4f}" if b.get("mean_rel_error") is not None else "-"
            lines.append(f"  {b['block']:>5} {b['achieved_sparsity']:>9.4f} {err:>13} {b['seconds']:>8.2f} "
                         f"{b['peak_memory_mb']:>9.0f}")
        return "\n".join(lines)


def achieved_sparsity(modules: List[Dict]) -> float:
    total = sum(m["numel"] for m in modules)
    return sum(m["zeros"] for m in modules) / total if total else 0.0


def verify_sparsity(modules: List[Dict], pattern: str, expected: List[str], global_scope: bool = False) -> Dict:
    """Every expected module pruned to its target: N:M exact per module (each complete group), unstructured
    within rounding (``1 / cols``), the whole within 0.02 of the target (global scope: the whole only).
    Returns the check, with ``problems`` listing what fell short."""
    nm = parse_pattern(pattern) if pattern else None
    short = []
    for m in modules:
        if nm is not None:
            ok = m.get("nm_ok", False) and m["zeros"] >= m["rows"] * (m["cols"] // nm[1]) * (nm[1] - nm[0])
        elif global_scope:
            ok = True
        else:  # rounding: a mask removes round(cols * s) per row at worst
            ok = m["achieved"] >= m["target"] - 1.0 / m["cols"] - 1e-9
        if not ok:
            short.append(f"{m['name']} {m['achieved']:.4f} < {m['target']:.4f}")
    total = sum(m["numel"] for m in modules)
    wanted = sum(m["target"] * m["numel"] for m in modules) / total if total else 0.0
    achieved = achieved_sparsity(modules)
    problems = []
    done = {m["name"] for m in modules}
    missing = [n for n in expected if n not in done]
    if missing or len(done) != len(expected):
        problems.append(f"pruned {len(done)} of the {len(expected)} targeted modules"
                        + (f" (never reached by the calibration forward: {missing[:6]})" if missing else ""))
    if short:
        problems.append(f"{len(short)} modules below their target: " + "; ".join(short[:5]))
    if total and nm is None and achieved < wanted - 0.02:  # N:M is checked exactly per module above
        problems.append(f"achieved sparsity {achieved:.4f} against a target of {wanted:.4f}")
    return {"targeted_modules": len(expected), "pruned_modules": len(modules), "short_modules": len(short),
            "target": wanted, "achieved": achieved, "ok": not problems, "problems": problems}


@torch.no_grad()
def prune_model(model: nn.Module, tokenizer, cfg: MaskConfig, calib: Optional[CalibConfig] = None, device=None,
                calib_ids: Optional[torch.Tensor] = None, progress: bool = True, verify: bool = True,
                checkpoint_dir=None, store=None) -> PruneReport:
    """Prune ``model`` in place with the mask method ``cfg`` names and return the report.

    Refuses (:class:`~compress.core.errors.UnsupportedModelError`) before any work when the selected modules
    include some it cannot prune or when nothing is selected; with ``verify`` raises
    :class:`~compress.core.errors.ShortfallError` (carrying the report) when fewer modules, or less, than
    targeted were pruned. ``checkpoint_dir``: the block walk checkpoints every block there and resumes from it;
    ``store``: a :class:`~compress.calibration.onload.DiskBlocks` for a model on the meta device.
    """
    t_start = time.perf_counter()
    calib = calib or CalibConfig()
    method = spec_of(cfg).impl(cfg)
    nm = cfg.nm
    targets = resolve_targets(model, cfg.targets, cfg.ignore).require("prune")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    report = PruneReport(cfg.method, cfg.pattern, cfg.target_sparsity)
    report.targets = {"model_class": targets.model_class, "blocks": targets.blocks_name, "targets": list(targets.patterns),
                      "ignore": list(targets.ignore), "modules": len(targets),
                      "per_block": [list(b) for b in targets.per_block[:1]]}
    if (method.needs_calibration or cfg.schedule == "owl") and calib_ids is None:
        calib_ids, report.calibration = load_calibration(tokenizer, calib.source, calib.nsamples, calib.seqlen,
                                                         calib.seed, calib.text_field)
    elif calib_ids is not None:
        report.calibration = {"nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), "given": True}
    sparsities = layer_sparsities(cfg, len(targets.per_block), model=model, calib_ids=calib_ids,
                                  batch_size=calib.batch_size, device=device, offload=cfg.offload, progress=progress)
    report.layer_sparsities = sparsities if cfg.schedule != "uniform" else None
    done = linear_pass(model, method, cfg, targets, calib_ids, sparsities=sparsities, nm=nm,
                       batch_size=calib.batch_size, device=device, progress=progress, desc=f"prune {cfg.method}",
                       stage="prune", checkpoints=walk_checkpoints(checkpoint_dir, calib_ids, len(targets.per_block)),
                       store=store)
    report.modules, report.blocks, report.mode, report.walk = done.modules, done.blocks, done.mode, done.walk
    report.blocks_reconstruction, report.calib_seconds = done.reconstruction, done.calib_seconds
    report.seconds = time.perf_counter() - t_start
    if verify:
        report.verify(list(targets.flat()), targets.describe(), global_scope=getattr(cfg, "scope", "") == "global")
    return report


class PruneStage:
    """``prune=<mask method>``: see the module docstring."""

    name = "prune"

    @staticmethod
    def ranks_refusal(cfg) -> str:
        """Several ranks (torch.distributed): supported."""
        return ""

    @staticmethod
    def disk_precheck(cfg) -> None:
        """model.load=disk: what needs every block at once is refused before loading."""
        p = cfg.prune
        if getattr(p, "schedule", "uniform") != "uniform":
            raise ConfigError(f"prune.schedule={p.schedule} walks the model twice (outlier ratios, then pruning), "
                              "which model.load=disk does not support yet; use prune.schedule=uniform or model.load=memory")
        if getattr(p, "scope", "") == "global":
            raise ConfigError("prune.scope=global needs every weight at once (one threshold over the whole model), "
                              "which model.load=disk does not support; use prune.scope=layer or model.load=memory")

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg.prune
        store = ctx.disk_store()
        try:
            report = prune_model(ctx.model, ctx.tokenizer, cfg, ctx.cfg.calib, device=ctx.device,
                                 checkpoint_dir=ctx.checkpoint_dir, store=store)
        except ShortfallError as e:  # what it did is recorded before the stage fails
            if isinstance(e.result, PruneReport):
                e.result = self._result(ctx, e.result)
            raise
        return self._result(ctx, report, ctx.finish_disk(store) if store is not None else None)

    @staticmethod
    def _result(ctx: StageContext, report: PruneReport, weights=None) -> StageResult:
        summary = dict(report.summary(), check=report.check)
        if report.mode:
            summary.update(mode=report.mode["chosen"], mode_decision=report.mode)
        if report.walk.get("resumed_at") is not None:
            summary["resumed_at_block"] = report.walk["resumed_at"]
        return StageResult(ctx.model, summary=summary, sections={"prune_report": report.to_dict()},
                           protocol={"calibration": report.calibration},
                           facts={"nm": ctx.cfg.prune.nm, "pattern": ctx.cfg.prune.pattern},
                           saver=DiskSaver(weights) if weights is not None else PretrainedSaver(), printed=report.table(),
                           weights=weights)

"""The block loop every calibration-based method shares, and the contract of a method that compresses
linears one at a time.

:class:`BlockLoop` walks the decoder blocks with :func:`compress.calibration.runner.run_sequential`.
In each block it collects the statistics a method declared (``needs_hessian``, ``needs_sqnorm``,
``needs_moments``) on the target linears' inputs and calls ``compress_linear(block_index, name, module,
stats)`` for each target, in forward order, in one of two modes:

* ``two_pass``: one pass collects the statistics of all target linears on the block's inputs (each batch
  after the first stops once it has fed every target), all are compressed, a second pass produces the
  block's outputs for the next block (one sample's activations at a time);
* ``single_pass``: one pass; every sample pauses at each target linear until all have reached it, the
  linear is compressed, and the samples go on through the compressed linear (so each linear sees the
  inputs left by the compressed linears before it: GPTQ's "true sequential", SparseGPT's sequential
  mode; about half the time, but every sample waits inside the block).

``sequential="auto"`` decides on the first block from the memory estimate of
:mod:`compress.calibration.memory`: the single pass when it fits ``memory_budget`` x the free memory of
the device holding the activations. Stages add their own steps through the ``before_statistics``,
``before_block`` and ``after_single_pass`` hooks; nothing here knows a method.

:func:`observe_blocks` is the same walk for what only reads statistics and outputs (structured
importance, OWL's outlier ratios): one forward per block with the statistics hooks live.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from compress.calibration.blocks import BlockInputs
from compress.calibration.memory import LinearShape, MiB, estimate_peaks, probe_linears
from compress.calibration.runner import BlockResult, run_sequential
from compress.calibration.stats import InputStats, StatsCollector, run_single_pass
from compress.calibration.targets import Targets
from compress.core.config import fraction, tristate
from compress.core.distributed import broadcast_, broadcast_object, rank, world_size
from compress.core.memory import free_memory_bytes
from compress.core.modules import text_config


@dataclass
class LoopConfig:
    """The block loop's settings, a mixin of config fields for the methods that calibrate."""

    # true: single pass (linears compressed in forward order on already-compressed inputs; every calibration
    # sample waits inside the block); false: two passes (one sample's activations at a time); auto: the
    # single pass when its estimated peak memory fits memory_budget x the free memory of the device holding
    # the activations, else two passes
    sequential: str = "auto"
    memory_budget: float = 0.5  # sequential=auto: fraction of the free device memory the single pass may use
    offload: bool = False  # keep blocks on the CPU and onload one at a time

    def validate_loop(self) -> None:
        self.sequential = tristate(self.key("sequential"), self.sequential)
        fraction(self.key("memory_budget"), self.memory_budget, 0.0, 1.0, lo_open=True, hi_open=False)


@dataclass
class LinearJob:
    """What the stage tells a method about one linear."""

    key: str  # "<block>.<name>"
    block: int
    sparsity: float = 0.0  # this block's target (mask methods)
    nm: Optional[Tuple[int, int]] = None  # N kept of every M inputs (mask methods)
    keep: Optional[torch.Tensor] = None  # [out, in] bool: False where a weight must stay zero (a pruned model)


@dataclass
class LinearResult:
    """A method's answer for one linear: the new ``[out, in]`` weight (float32; zeros where pruned), and,
    when it lies on an integer grid, the grid (``spec``) and its parameters ``[out, groups]``."""

    weight: torch.Tensor
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    spec: Optional[object] = None  # compress.core.grid.GridSpec
    info: Dict = field(default_factory=dict)
    kept_zeros: bool = False  # a pruned linear's zeros were held at zero


class LinearMethod:
    """A method that compresses linears one at a time: it declares the statistics it needs, and
    :meth:`step` returns each linear's new weight. It never walks blocks or registers hooks."""

    kind = ""  # prune | quant
    needs_calibration = True
    needs_hessian = False
    needs_sqnorm = False
    needs_moments = False
    preserves_zeros = False  # the stage passes a pruned linear's zeros as job.keep

    @staticmethod
    def work_floats(out_features: int, in_features: int) -> float:
        """float32 values allocated while one ``[out, in]`` linear is compressed (scores, mask, the new weight,
        the error terms): the memory estimator's per-linear working set. Measured for Wanda and SparseGPT
        at 4096 x 11008 (heap peak above the weight, the statistics and the damped factor): Wanda 1.75,
        SparseGPT 1.4."""
        return 1.5 * out_features * in_features

    def prepare(self, targets: Targets, sparsities: List[float]) -> None:
        """Called once before the walk (e.g. a global threshold over every target)."""

    def step(self, weight: torch.Tensor, stats: Optional[InputStats], job: LinearJob) -> LinearResult:
        raise NotImplementedError

    def info(self, stats: Optional[InputStats]) -> Dict:
        """Per-module facts for the report (e.g. the damping a Hessian needed)."""
        return {}


log = logging.getLogger(__name__)

CompressFn = Callable[[int, str, nn.Module, Optional[InputStats]], None]


def decide_mode(sequential: str, memory_budget: float, method, shapes: List[LinearShape], inputs: BlockInputs,
                model: nn.Module, device, dense_stream: bool = False, forced: str = "",
                two_pass_reason: str = "") -> Dict:
    """Single pass or two passes, and why (see the module docstring). ``forced``: an option that needs
    the single pass; ``two_pass_reason``: one that needs two passes."""
    hidden = inputs.hidden[0].shape[-1]
    est = estimate_peaks(shapes, hidden, inputs.ntokens(), inputs.hidden[0].shape[0] * inputs.hidden[0].shape[1],
                         inputs.hidden[0].element_size(), method.needs_hessian, method.work_floats,
                         dense_stream=dense_stream, intermediate=getattr(text_config(model), "intermediate_size", None))
    free = free_memory_bytes(device)
    budget = free * float(memory_budget) if free is not None else None
    info = {"requested": sequential, "estimate": est.to_dict(), "device": str(device),
            "free_mb": round(free / MiB, 1) if free is not None else None,
            "memory_budget": float(memory_budget), "budget_mb": round(budget / MiB, 1) if budget else None}
    if sequential == "true":
        chosen, why = "single_pass", "sequential=true"
    elif sequential == "false":
        chosen, why = "two_pass", "sequential=false"
    elif forced:
        chosen, why = "single_pass", f"{forced} needs the single pass"
    elif two_pass_reason:
        chosen, why = "two_pass", two_pass_reason
    elif budget is None:
        chosen, why = "single_pass", "free memory unknown"
    elif est.single_pass_bytes <= budget:
        chosen, why = "single_pass", "the single pass fits the budget"
    else:
        chosen, why = "two_pass", "the single pass would exceed the budget"
    info.update(chosen=chosen, reason=why)
    if chosen == "single_pass" and budget is not None and est.single_pass_bytes > budget:
        log.warning("the single pass needs about %.0f MiB on %s beyond the model, over the budget of %.0f MiB "
                    "(%.2f of %.0f MiB free); sequential=false needs about %.0f MiB.", est.single_pass_bytes / MiB,
                    device, budget / MiB, memory_budget, free / MiB, est.two_pass_bytes / MiB)
    return info


def mode_line(info: Dict, stage: str = "") -> str:
    e = info["estimate"]
    budget = (f"{info['budget_mb']:.0f} MiB ({info['memory_budget']:g} of {info['free_mb']:.0f} MiB free on "
              f"{info['device']})") if info.get("budget_mb") else "unknown"
    return (f"{stage + ' ' if stage else ''}mode: {info['chosen']} ({info['reason']}); estimated peak beyond the model: "
            f"single pass {e['single_pass_mb']:.0f} MiB, two passes {e['two_pass_mb']:.0f} MiB; budget {budget}")


class BlockLoop:
    """One calibration walk over the decoder blocks (see the module docstring)."""

    def __init__(self, model: nn.Module, targets: Targets, method, compress_linear: CompressFn, *,
                 sequential: str = "auto", memory_budget: float = 0.5, device=None, offload: bool = False,
                 propagate: str = "pruned", batch_size: int = 1, dense_stream: bool = False, forced: str = "",
                 two_pass_reason: str = "", progress: bool = True, desc: str = "calibrate", stage: str = "",
                 checkpoints=None, store=None):
        self.model, self.targets, self.method, self.compress_linear = model, targets, method, compress_linear
        self.sequential, self.memory_budget = sequential, memory_budget
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.offload, self.propagate, self.batch_size = offload, propagate, batch_size
        self.dense_stream, self.forced, self.two_pass_reason = dense_stream, forced, two_pass_reason
        self.progress, self.desc, self.stage = progress, desc, stage
        self.checkpoints = checkpoints  # compress.calibration.checkpoint.BlockCheckpoints, or None
        self.store = store  # where blocks live between turns (None: in the model)
        self.walk: Dict = {}  # what the walk reports (resumed_at, checkpoint seconds)
        self.mode: Dict = {}
        self.block_seconds: List[float] = []
        self._probes: Dict[tuple, List[LinearShape]] = {}

    # -- hooks for what a stage adds around the plain loop
    def before_statistics(self, bidx: int, block: nn.Module, inputs: BlockInputs) -> None:
        """Runs first in each block, before anything is collected (e.g. a block transform such as AWQ)."""

    def dense_outputs(self, bidx: int, block: nn.Module, dense: Optional[BlockInputs]) -> Optional[List[torch.Tensor]]:
        """Runs first in each block, before any statistics hook exists (e.g. regression targets)."""
        return None

    def before_block(self, bidx: int, block: nn.Module, inputs: BlockInputs, dense: Optional[BlockInputs],
                     collector: StatsCollector, dense_outs) -> Optional[List[torch.Tensor]]:
        """Runs next, hooks live; returns the dense stream's outputs when one is carried."""
        return dense_outs

    def after_single_pass(self, bidx: int, block: nn.Module, inputs: BlockInputs, outputs: List[torch.Tensor],
                          dense_outputs, collector: StatsCollector) -> List[torch.Tensor]:
        return outputs

    def after_block(self, bidx: int, linears: Dict[str, nn.Module], t0: float) -> None:
        self.block_seconds.append(time.perf_counter() - t0)

    # -- several ranks (torch.distributed): statistics summed over ranks, the linears split between them
    compute_linear = None  # (bidx, name, module, stats) -> LinearResult: set by a caller that supports ranks
    apply_linear = None  # (bidx, name, module, stats, LinearResult): writes the weight, records the entry

    def owners(self, names: List[str], linears: Dict[str, nn.Module]) -> Dict[str, int]:
        """Which rank computes which linear: the largest (``out x in^2``, the column loop's cost) first, each to
        the least loaded rank (the same answer on every rank)."""
        load = [0.0] * world_size()
        out = {}
        cost = {n: float(linears[n].weight.numel()) * max(linears[n].weight.shape) for n in names}
        for n in sorted(names, key=lambda n: (-cost[n], names.index(n))):
            r = min(range(len(load)), key=lambda r: (load[r], r))
            out[n] = r
            load[r] += cost[n]
        return out

    def _share(self, res: Optional[LinearResult], owner: int, device) -> LinearResult:
        """The owner's result, on every rank (weights and grid parameters broadcast as tensors)."""
        mine = rank() == owner
        meta = None
        if mine:
            meta = {"spec": res.spec, "info": res.info, "kept_zeros": res.kept_zeros,
                    **{k: None if getattr(res, k) is None else (tuple(getattr(res, k).shape), getattr(res, k).dtype)
                       for k in ("weight", "scale", "zero")}}
        meta = broadcast_object(meta, src=owner)
        tensors = {}
        for k in ("weight", "scale", "zero"):
            if meta[k] is None:
                tensors[k] = None
                continue
            t = getattr(res, k).contiguous() if mine else torch.empty(meta[k][0], dtype=meta[k][1], device=device)
            tensors[k] = broadcast_(t, owner)
        return LinearResult(tensors["weight"], tensors["scale"], tensors["zero"], meta["spec"], dict(meta["info"]),
                            meta["kept_zeros"])

    def compress_split(self, bidx: int, names: List[str], linears: Dict[str, nn.Module], stats: Dict[str, InputStats]):
        """Each rank computes the linears it owns, then every result is shared and applied on every rank."""
        owners = self.owners(names, linears)
        mine = {n: self.compute_linear(bidx, n, linears[n], stats[n]) for n in names if owners[n] == rank()}
        for n in names:
            res = self._share(mine.get(n), owners[n], linears[n].weight.device)
            self.apply_linear(bidx, n, linears[n], stats[n], res)

    # -- what a checkpoint keeps of a finished block beyond its weights (see runner.Persist)
    def state_of(self, bidx: int) -> Tuple[Dict, Dict[str, torch.Tensor]]:
        return {}, {}

    def restore(self, bidx: int, state: Dict, tensors: Dict[str, torch.Tensor]) -> None:
        """A finished block restored from a checkpoint: take back what :meth:`state_of` gave."""

    # -- the loop
    def run(self, calib_ids: torch.Tensor) -> Dict:
        self.walk = run_sequential(self.model, calib_ids, self.process_block, batch_size=self.batch_size,
                                   device=self.device, offload=self.offload, propagate=self.propagate,
                                   dense_stream=self.dense_stream, progress=self.progress, desc=self.desc,
                                   checkpoints=self.checkpoints, persist=self, store=self.store)
        return self.mode

    def process_block(self, bidx: int, block: nn.Module, inputs: BlockInputs, dense: Optional[BlockInputs]):
        t0 = time.perf_counter()
        self.before_statistics(bidx, block, inputs)
        linears = self.targets.per_block[bidx]
        key = tuple(linears)
        if key not in self._probes:  # blocks of one class share the structure: probed once (one batch)
            self._probes[key] = probe_linears(block, inputs, linears)
        shapes = self._probes[key]
        if not self.mode:  # decided once, on the first block
            self.mode = decide_mode(self.sequential, self.memory_budget, self.method, shapes, inputs, self.model,
                                    self.device, self.dense_stream, self.forced, self.two_pass_reason)
            if self.progress:
                print(mode_line(self.mode, self.stage))
        dense_outs = self.dense_outputs(bidx, block, dense)
        groups = {s.name: s.group for s in shapes}
        collector = StatsCollector(linears, self.method.needs_hessian, self.method.needs_sqnorm, self.device,
                                   groups=groups, moments=self.method.needs_moments)

        ranks = world_size() > 1 and self.compute_linear is not None
        reduced: List[InputStats] = []

        def reduce(stats):  # statistics summed over ranks, once per distinct input
            for st in stats:
                if not any(st is r for r in reduced):
                    st.all_reduce()
                    reduced.append(st)

        done = set()

        def compress_now(name):
            if not ranks:
                self.compress_linear(bidx, name, linears[name], collector.stats[name])
            elif name not in done:  # the whole input group at once (q/k/v, gate/up read the same tensor),
                # split over ranks; the others are released when the batches reach them
                group = [s.name for s in shapes if s.group == groups[name] and s.name not in done]
                st = collector.stats[name]  # the group's statistics (the others reach their hooks later)
                reduce([st])
                self.compress_split(bidx, group, linears, {n: st for n in group})
                done.update(group)
            collector.release(name)  # its Hessian is freed after its last user

        try:
            dense_outs = self.before_block(bidx, block, inputs, dense, collector, dense_outs)
            if self.mode["chosen"] == "single_pass":
                outs = run_single_pass(block, inputs, collector, compress_now)
                outs = self.after_single_pass(bidx, block, inputs, outs, dense_outs, collector)
                result = BlockResult(outputs=outs, dense_outputs=dense_outs)
            else:  # statistics pass, compress all; the pipeline then runs the block for the outputs,
                # except with propagate=dense, where the outputs before compression are the ones to propagate
                result = None
                if self.propagate == "dense":
                    result = BlockResult(dense_outputs=collector.forward_all(block, inputs))
                else:
                    collector.collect_all(block, inputs)  # stops each batch after the last linear
                if ranks:
                    names = list(collector.order)
                    reduce([collector.stats[n] for n in names])
                    self.compress_split(bidx, names, linears, dict(collector.stats))
                    for name in names:
                        collector.release(name)
                else:
                    for name in list(collector.order):
                        compress_now(name)
        finally:
            collector.remove()
        self.after_block(bidx, linears, t0)
        return result


ObserveFn = Callable[[int, nn.Module, BlockInputs, List[torch.Tensor], Dict[str, InputStats]], None]


@torch.no_grad()
def observe_blocks(model: nn.Module, calib_ids: torch.Tensor, observe: ObserveFn,
                   linears_of: Optional[Callable[[int, nn.Module], Dict[str, nn.Module]]] = None, *,
                   hessian: bool = False, sqnorm: bool = False, moments: bool = False, propagate: str = "pruned",
                   batch_size: int = 1, device=None, offload: bool = False, progress: bool = True,
                   desc: str = "observe") -> None:
    """Walk the blocks without changing them: one forward per block over every calibration batch, with the
    statistics (``hessian`` / ``sqnorm`` / ``moments``) of the linears ``linears_of(index, block)``
    collected, then ``observe(index, block, inputs, outputs, stats)``. The outputs feed the next block
    (``propagate`` says which stream, as for the compressing loop)."""

    def process(bidx, block, inputs, dense=None):
        linears = linears_of(bidx, block) if linears_of is not None else {}
        collector = StatsCollector(linears, hessian, sqnorm, device if device is not None else inputs.hidden[0].device,
                                   moments=moments)
        try:
            outs = collector.forward_all(block, inputs)
        finally:
            collector.remove()
        seen: List[InputStats] = []
        for st in collector.stats.values():  # several ranks: statistics summed over them
            if not any(st is x for x in seen):
                st.all_reduce()
                seen.append(st)
        observe(bidx, block, inputs, outs, collector.stats)
        return BlockResult(dense_outputs=outs) if propagate == "dense" else BlockResult(outputs=outs)

    run_sequential(model, calib_ids, process, batch_size=batch_size, device=device, offload=offload,
                   propagate=propagate, progress=progress, desc=desc)

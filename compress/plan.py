"""``compress plan <overrides>``: what a run would need, from the model's config alone (no weight is read).

For the model built on the meta device it prints, per stage, the block mode ``sequential=auto`` would
choose, the estimated peak memory of the process (host; the device holding the activations is the same
on CPU), the disk space the run writes, and an estimated time from rates measured on this machine when
the plan runs. A normal run makes the same memory and disk estimates before loading and refuses a
configuration that cannot fit, naming the resource and the numbers (:func:`refuse_if_it_cannot_fit`).

Memory, per phase (bytes; ``B``: the process after importing torch and transformers, measured here):

* a calibration walk: ``B`` + the weights held (in memory: the whole model in the run's dtype; on disk:
  the largest block) + the walk's own peak from :func:`compress.calibration.memory.estimate_peaks` (the
  block's inputs and outputs for every sample, the statistics, the factor and the method's working set),
  in the mode the walk would choose; on disk also a block's copy while its output shard is written;
* a whole-model transform (``transform=rotation``): ``B`` + the model + what the transform declares it
  adds (``plan_bytes``: the untied head) + its transient working set; what it adds is held by every later
  phase;
* evaluation: ``B`` + the weights held (on disk: embeddings and head) + every window's hidden states
  when streamed + one window's logits (float32, three copies during the loss);
* saving: a quantized model in memory is copied once to be packed (compressed-tensors); the fingerprint of
  the saved weights holds three float32 copies of the largest linear.

Time: the forward passes (``2 x parameters`` FLOPs per token, plus causal attention), the statistics
(``tokens x in^2`` per distinct input), the damped factorisations (``in^3`` at the rate of a measured
factorisation) and each linear's step (the method's own step timed here on three small random linears and
fitted as ``a out in^2 + b out in + c in``), plus the checkpoint and shard writes at a measured write rate.
Measured against real runs in BENCHMARKS.md ("compress plan against measured runs").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from compress.calibration.blocks import find_blocks
from compress.calibration.loop import LinearJob, LinearMethod
from compress.calibration.memory import LinearShape, estimate_peaks
from compress.calibration.roles import block_structure
from compress.calibration.stats import InputStats
from compress.calibration.targets import resolve_targets
from compress.core.errors import ConfigError, UnsupportedModelError
from compress.core.linalg import damped_inverse_cholesky
from compress.core.memory import MiB, free_memory_bytes, proc_kb
from compress.core.modules import text_config, unique_parameters, weight_matrix
from compress.core.runtime import resolve_device
from compress.models import decide_load, meta_model, model_path, resolve_dtype
from compress.registry import spec_of

GiB = 2**30
ROLE_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o", "gate": "mlp_in", "up": "mlp_in",
              "down": "down"}


@dataclass
class Rates:
    """Rates measured on this machine when the plan runs."""

    matmul_flops_s: float
    factor_s_per_n3: float  # seconds of one damped inverse Cholesky factor, per in^3
    write_bytes_s: float
    baseline_bytes: float  # this process's resident memory after importing torch and transformers
    steps: Dict[str, tuple] = field(default_factory=dict)  # method -> (a, b, c) of a out in^2 + b out in + c in

    def to_dict(self) -> Dict:
        return {"matmul_gflops": round(self.matmul_flops_s / 1e9, 2), "factor_ns_per_n3": self.factor_s_per_n3 * 1e9,
                "write_mb_s": round(self.write_bytes_s / MiB, 1), "baseline_mb": round(self.baseline_bytes / MiB, 1),
                "steps": {k: list(v) for k, v in self.steps.items()}}


def _rss_bytes() -> float:
    kb = proc_kb("/proc/self/status", "VmRSS")
    return kb * 1024.0 if kb is not None else 600 * MiB


def _timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_rates(methods: Dict[str, LinearMethod], where: Path, dtype=torch.float32) -> Rates:
    """Matrix-product rate, factorisation rate, write rate, and each method's step fitted on three shapes
    (a few seconds in all)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 2048, generator=g, dtype=dtype)
    b = torch.randn(2048, 2048, generator=g, dtype=dtype)
    mm = 2 * 1024 * 2048 * 2048 / _timed(lambda: a @ b)
    n = 1024
    x = torch.randn(4 * n, n, generator=g)
    h = x.t() @ x
    fac = _timed(lambda: damped_inverse_cholesky(h, 0.01, "mean")) / n ** 3
    where.mkdir(parents=True, exist_ok=True)
    buf = torch.zeros(32 * MiB // 4).numpy().tobytes()
    path = Path(tempfile.mkstemp(dir=where, prefix=".plan-write-")[1])
    try:
        def write():
            with open(path, "wb") as f:
                f.write(buf)
                f.flush()
                os.fsync(f.fileno())
        wr = len(buf) / _timed(write, repeat=2)
    finally:
        path.unlink(missing_ok=True)
    steps = {}
    for name, m in methods.items():
        try:
            m.prepare(None, [0.5])
            steps[name] = _fit_step(m)
        except Exception:  # a method whose step needs more than a random linear: its steps are not timed
            steps[name] = (0.0, 0.0, 0.0)
    return Rates(mm, fac, wr, 0.0, steps)


def _fit_step(method: LinearMethod) -> tuple:
    """The method's step timed on random linears, fitted as ``a out in^2 + b out in + c in`` (least squares
    in relative error over three shapes)."""
    shapes = [(256, 512), (1024, 512), (256, 2048)]
    rows, ts = [], []
    for out_f, in_f in shapes:
        g = torch.Generator().manual_seed(out_f + in_f)
        w = torch.randn(out_f, in_f, generator=g)
        stats = InputStats(in_f, method.needs_hessian, method.needs_sqnorm, moments=method.needs_moments)
        stats.add(torch.randn(2 * in_f, in_f, generator=g))
        job = LinearJob("0.plan", 0, sparsity=0.5)
        t = _timed(lambda: method.step(w.clone(), stats, job), repeat=2)
        rows.append([out_f * in_f ** 2, out_f * in_f, in_f])
        ts.append(t)
    A = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ts, dtype=torch.float64)
    coef = torch.linalg.solve(A, y)  # three shapes, three unknowns
    coef = coef.clamp_min(0)
    if float((A @ coef - y).abs().max() / y.max()) > 0.25:  # a negative term was clipped: fit the dominant one
        coef = torch.tensor([0.0, float((y / A[:, 1]).mean()), 0.0], dtype=torch.float64)
    return tuple(float(c) for c in coef)


def block_shapes(model, linears: Dict[str, torch.nn.Module]) -> List[LinearShape]:
    """The block's target linears in forward order with the distinct input each reads, from the role map
    (q/k/v share the attention input, gate/up the MLP input); where no role pattern matches the block, each
    linear is counted as reading its own input (an upper bound on the statistics)."""
    try:
        roles = block_structure(model).blocks[0].module_roles()
    except (UnsupportedModelError, AttributeError, TypeError, ValueError, IndexError):
        roles = {}
    groups: Dict[str, int] = {}
    out = []
    for name, mod in linears.items():
        rs = roles.get(name)
        key = ROLE_INPUT.get(rs[0], name) if rs else name
        gid = groups.setdefault(key, len(groups))
        o, i = weight_matrix(mod).shape
        out.append(LinearShape(name, o, i, gid))
    return out


def _bytes(model, dtype) -> Dict:
    size = torch.empty(0, dtype=dtype).element_size()
    blocks_name, blocks = find_blocks(model)
    per_block = [sum(p.numel() for p in b.parameters()) * size for b in blocks]
    total = sum(p.numel() for p in unique_parameters(model)) * size
    emb = model.get_input_embeddings().weight.numel() * size
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_b = 0 if head is None else head.weight.numel() * size
    return {"model": total, "block": max(per_block), "blocks": len(blocks), "embeddings": emb, "head": head_b,
            "tied": tied, "block_params": max(per_block) // size, "element_size": size}


def _walk_estimate(cfg, slot_cfg, meta, sizes, load_mode: str, free: Optional[float]) -> Dict:
    """A calibration walk (a method that compresses linears one at a time): mode, memory, flop counts."""
    method = spec_of(slot_cfg).impl(slot_cfg)
    targets = resolve_targets(meta, slot_cfg.targets, slot_cfg.ignore)
    shapes = block_shapes(meta, targets.per_block[0])
    tc = text_config(meta)
    hidden = tc.hidden_size
    c = cfg.calib
    tokens, batch_tokens = c.nsamples * c.seqlen, c.batch_size * c.seqlen
    dense_stream = bool(getattr(slot_cfg, "error_correction", False) or getattr(slot_cfg, "reconstruct_epochs", 0)
                        or getattr(slot_cfg, "dense_stats", False))
    out: Dict = {"method": slot_cfg.method, "calibration": method.needs_calibration, "linears": len(targets)}
    if method.needs_calibration:
        est = estimate_peaks(shapes, hidden, tokens, batch_tokens, sizes["element_size"], method.needs_hessian,
                             method.work_floats, dense_stream=dense_stream,
                             intermediate=getattr(tc, "intermediate_size", None))
        seq = getattr(slot_cfg, "sequential", "auto")
        budget = free * float(getattr(slot_cfg, "memory_budget", 0.5)) if free is not None else None
        forced = slot_cfg.needs_single_pass() if hasattr(slot_cfg, "needs_single_pass") else ""
        if seq == "true" or forced:
            mode = "single_pass"
        elif seq == "false" or getattr(slot_cfg, "propagate", "pruned") == "dense":
            mode = "two_pass"
        else:
            mode = "single_pass" if budget is None or est.single_pass_bytes <= budget else "two_pass"
        extra = est.single_pass_bytes if mode == "single_pass" else est.two_pass_bytes
        out.update(mode=mode, estimate=est.to_dict(), budget_bytes=budget, extra_bytes=extra,
                   smallest_bytes=min(est.single_pass_bytes, est.two_pass_bytes), key=slot_cfg.key("memory_budget"),
                   budget_fraction=float(getattr(slot_cfg, "memory_budget", 0.5)), free_bytes=free)
        inputs = tokens * hidden * sizes["element_size"]
    else:
        mode, extra, inputs = "no calibration", 0.0, 0.0
        out.update(mode=mode, extra_bytes=0.0)
    held = sizes["model"] if load_mode == "memory" else sizes["block"]
    peak = held + extra
    if load_mode == "disk":  # a block's copy while its shard is written, the hidden states alive
        peak = max(peak, sizes["block"] * 2 + 2 * inputs)
    out["host_bytes_beyond_baseline"] = peak
    out["shapes"] = shapes
    out["method_obj"] = method
    out["tokens"], out["dense_stream"] = tokens, dense_stream
    return out


def _walk_seconds(w: Dict, sizes: Dict, rates: Rates, cfg, tc, load_mode: str, checkpoint: bool) -> float:
    n = sizes["blocks"]
    T = w["tokens"] if w["calibration"] else 0
    seq = cfg.calib.seqlen
    fwd = (2 * T * sizes["block_params"] + 2 * T * seq * tc.hidden_size) / rates.matmul_flops_s
    passes = (1 if w["mode"] == "single_pass" else 2) + (1 if w["dense_stream"] else 0) if T else 0
    m = w["method_obj"]
    groups: Dict[int, int] = {}
    for s in w["shapes"]:
        groups.setdefault(s.group, s.in_features)
    stats = sum(T * i * i for i in groups.values()) / rates.matmul_flops_s if (T and m.needs_hessian) else 0.0
    factor = sum(i ** 3 for i in groups.values()) * rates.factor_s_per_n3 if (T and m.needs_hessian) else 0.0
    a, b, c = rates.steps.get(w["method"], (0.0, 0.0, 0.0))
    steps = sum(a * s.out_features * s.in_features ** 2 + b * s.out_features * s.in_features + c * s.in_features
                for s in w["shapes"])
    io = 0.0
    if load_mode == "disk":
        io += sizes["block"] / rates.write_bytes_s
    if checkpoint and T:
        io += (T * tc.hidden_size * sizes["element_size"] + (sizes["block"] if load_mode == "memory" else 0)) \
            / rates.write_bytes_s
    per_block = passes * fwd + stats + factor + steps + io
    w["seconds_per_block"] = {"forward": passes * fwd, "statistics": stats, "factor": factor, "steps": steps, "io": io}
    return n * per_block


def _eval_estimate(cfg, sizes, tc, load_mode: str) -> Dict:
    e = cfg.eval
    vocab = tc.vocab_size
    logits = e.batch_size * e.seqlen * vocab * 4 * 3
    if load_mode == "disk":  # the blocks walk (one block, every window's hidden states), then embeddings + head
        windows = (e.max_windows or 40) * e.seqlen * tc.hidden_size * sizes["element_size"]
        return {"host_bytes_beyond_baseline": max(sizes["block"] + 2 * windows,
                                                  sizes["embeddings"] + (0 if sizes["tied"] else sizes["head"])
                                                  + windows + logits)}
    else:
        held = sizes["model"] + e.batch_size * e.seqlen * (4 * tc.hidden_size + 3 * getattr(tc, "intermediate_size",
                                                                                         tc.hidden_size)) * 4
    return {"host_bytes_beyond_baseline": held + logits}


def estimate(cfg, measure: bool = True, baseline: Optional[float] = None) -> Dict:
    """The plan of ``cfg`` (see the module docstring): per stage, mode and estimated host peak; the disk the
    run writes; with ``measure``, rates measured here and time estimates."""
    device = resolve_device_name(cfg)
    load = decide_load(cfg.model, device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    meta = meta_model(cfg.model)
    sizes = loaded = _bytes(meta, dtype)
    tc = text_config(meta)
    free = free_memory_bytes("cpu")
    free_dev = free_memory_bytes(device)  # the walk's budget is a fraction of the device's free memory
    base = baseline if baseline is not None else _rss_bytes()
    mode = load["mode"]
    phases: List[Dict] = []
    walks = {}
    for slot in cfg.stages:
        sc = getattr(cfg, slot)
        if sc.method == "none":
            continue
        tf = getattr(cfg, "transform", None)
        if slot == "quant" and tf is not None and tf.method != "none":
            grows = getattr(spec_of(tf).impl, "plan_bytes", None)
            if grows is not None:  # a whole-model transform: what it adds stays for every later phase
                g = grows(meta)
                phases.append({"phase": "transform", "method": tf.method, "mode": "whole model",
                               "host_bytes": base + sizes["model"] + g["added_bytes"] + g["working_bytes"],
                               "added_bytes": g["added_bytes"]})
                sizes = dict(sizes, model=sizes["model"] + g["added_bytes"], tied=sizes["tied"] and not g["added_bytes"])
        try:
            impl = getattr(spec_of(sc), "impl", None)
        except Exception:  # not a registered method (e.g. the train stage)
            impl = None
        if isinstance(impl, type) and issubclass(impl, LinearMethod):
            w = _walk_estimate(cfg, sc, meta, sizes, mode, free_dev)
            walks[slot] = w
            phases.append({"phase": slot, "method": sc.method, "mode": w["mode"],
                           "host_bytes": base + w["host_bytes_beyond_baseline"], "walk": w})
        else:
            phases.append({"phase": slot, "method": sc.method, "mode": "whole model", "host_bytes": None,
                           "note": "not estimated (only calibration walks of linear methods are)"})
    quantized = any(getattr(getattr(cfg, s), "bits", None) for s in cfg.stages if getattr(cfg, s).method != "none")
    if cfg.output.save_model:
        copy = sizes["model"] if (mode == "memory" and quantized) else 0
        held = sizes["model"] if mode == "memory" else 0
        # the fingerprint of the saved weights: one linear at a time, read, made contiguous float32, hashed
        fingerprint = 3 * 4 * max((m.weight.numel() for m in resolve_targets(meta).flat().values()), default=0)
        phases.append({"phase": "save", "mode": "links the shards" if mode == "disk" else "write",
                       "host_bytes": base + held + max(copy, fingerprint)})
    ev = _eval_estimate(cfg, sizes, tc, mode)
    phases.append({"phase": "eval", "mode": "streamed" if mode == "disk" else "in memory",
                   "host_bytes": base + ev["host_bytes_beyond_baseline"]})
    if not measure:
        for p in phases:
            if "walk" in p:
                p["walk"] = {k: v for k, v in p["walk"].items() if k not in ("shapes", "method_obj")}
    known = [p["host_bytes"] for p in phases if p["host_bytes"] is not None]
    peak = max(known) if known else base + sizes["model"]
    # disk: on disk every stage writes a checkpoint; in memory the checkpoints hold every block once per walk
    stages_written = sum(1 for s in walks.values() if s["calibration"] or mode == "disk")
    disk = sizes["model"] * (stages_written if mode == "disk" else 0)
    if cfg.output.checkpoint and mode == "memory":
        disk += sum(sizes["model"] - sizes["embeddings"] - (0 if sizes["tied"] else sizes["head"])
                    for s in walks.values() if s["calibration"])
    disk += max((w["tokens"] * tc.hidden_size * sizes["element_size"] * 2 for w in walks.values()), default=0)
    if cfg.output.save_model and mode == "memory":
        disk += sizes["model"]
    out_root = Path(os.getcwd())
    disk_free = shutil.disk_usage(out_root).free
    plan = {"model": cfg.model.name, "path": model_path(cfg.model), "class": type(meta).__name__,
            "blocks": sizes["blocks"], "dtype": str(dtype).replace("torch.", ""), "load": load,
            "bytes": {k: v for k, v in loaded.items() if k not in ("tied",)}, "baseline_bytes": base,
            "phases": phases, "peak_host_bytes": peak, "available_host_bytes": free,
            "disk_bytes": disk, "disk_free_bytes": disk_free,
            "fits": {"host": free is None or peak <= free, "disk": disk <= disk_free}}
    if measure:
        rates = measure_rates({s: w["method_obj"] for s, w in walks.items()}, out_root / ".compress-plan")
        shutil.rmtree(out_root / ".compress-plan", ignore_errors=True)
        rates.baseline_bytes = base
        rates.steps = {walks[s]["method"]: v for s, v in rates.steps.items()}
        for p in phases:
            if p["phase"] in walks:
                p["seconds"] = _walk_seconds(walks[p["phase"]], sizes, rates, cfg, tc, mode, cfg.output.checkpoint)
        for p in phases:
            if "walk" in p:
                p["walk"] = {k: v for k, v in p["walk"].items() if k not in ("shapes", "method_obj")}
        e = cfg.eval
        toks = (e.max_windows or 40) * e.seqlen
        ev_s = (2 * toks * (sizes["model"] / sizes["element_size"]) + 2 * toks * e.seqlen * tc.hidden_size
                * sizes["blocks"]) / rates.matmul_flops_s
        for p in phases:
            if p["phase"] == "eval":
                p["seconds"] = ev_s * len(e.datasets)
            if p["phase"] == "save":
                p["seconds"] = (0 if mode == "disk" else sizes["model"] / rates.write_bytes_s)
        plan["rates"] = rates.to_dict()
        secs = [p.get("seconds") for p in phases]
        plan["seconds"] = sum(s for s in secs if s is not None)
    return plan


def resolve_device_name(cfg) -> str:
    return resolve_device(cfg.model.device)


def refuse_if_it_cannot_fit(cfg, plan: Dict) -> None:
    """Before loading: a walk whose smallest mode exceeds its memory budget, a host peak over the available
    memory, or a run that writes more than the free disk, is refused naming the resource and the numbers."""
    for p in plan["phases"]:
        w = p.get("walk")
        if not w or w.get("budget_bytes") is None or "smallest_bytes" not in w:
            continue
        if w["smallest_bytes"] > w["budget_bytes"]:
            raise ConfigError(
                f"{w['key']}={w['budget_fraction']:g} allows {w['budget_bytes'] / MiB:.0f} MiB ({w['budget_fraction']:g} "
                f"of {w['free_bytes'] / MiB:.0f} MiB free on the device) for the {p['phase']} walk, which needs at least "
                f"{w['smallest_bytes'] / MiB:.0f} MiB beyond the weights (its smaller mode); raise {w['key']} or use "
                "fewer calibration tokens (calib.nsamples, calib.seqlen)")
    if not plan["fits"]["host"]:
        other = "model.load=disk holds one block at a time" if plan["load"]["mode"] == "memory" else \
            "fewer calibration tokens need less"
        raise ConfigError(f"the run needs about {plan['peak_host_bytes'] / MiB:.0f} MiB of host memory at its peak, "
                          f"{plan['available_host_bytes'] / MiB:.0f} MiB are available ({other}; `compress plan` "
                          "shows every phase)")
    if not plan["fits"]["disk"]:
        raise ConfigError(f"the run writes about {plan['disk_bytes'] / GiB:.2f} GiB, {plan['disk_free_bytes'] / GiB:.2f} "
                          "GiB are free on the disk of the run directory (`compress plan` shows the parts)")


def table(plan: Dict) -> str:
    b = plan["bytes"]
    lines = [f"compress plan: {plan['model']} ({plan['class']}, {plan['blocks']} blocks, {b['model'] / GiB:.2f} GiB in "
             f"{plan['dtype']}; largest block {b['block'] / MiB:.0f} MiB)",
             f"  load: {plan['load']['mode']} ({plan['load']['reason']})"]
    if plan.get("rates"):
        r = plan["rates"]
        lines.append(f"  measured here: matmul {r['matmul_gflops']:.1f} GFLOP/s, factorisation {r['factor_ns_per_n3']:.3f} "
                     f"ns per n^3, writes {r['write_mb_s']:.0f} MiB/s; process baseline {r['baseline_mb']:.0f} MiB")
    lines.append(f"  {'phase':<9} {'method':<14} {'mode':<18} {'host peak MiB':>14} {'seconds':>9}")
    for p in plan["phases"]:
        hb = f"{p['host_bytes'] / MiB:,.0f}" if p.get("host_bytes") is not None else "-"
        sec = f"{p['seconds']:,.0f}" if p.get("seconds") is not None else "-"
        lines.append(f"  {p['phase']:<9} {str(p.get('method', '')):<14} {p['mode']:<18} {hb:>14} {sec:>9}")
    fits = plan["fits"]
    lines.append(f"  peak host {plan['peak_host_bytes'] / MiB:,.0f} MiB of {plan['available_host_bytes'] / MiB:,.0f} MiB "
                 f"available: {'fits' if fits['host'] else 'DOES NOT FIT'}; disk {plan['disk_bytes'] / GiB:.2f} GiB "
                 f"of {plan['disk_free_bytes'] / GiB:.1f} GiB free: {'fits' if fits['disk'] else 'DOES NOT FIT'}"
                 + (f"; time about {plan['seconds'] / 60:.1f} min" if plan.get("seconds") is not None else ""))
    lines.append("  (GPU: the activations, statistics and the block being compressed go to the device; this machine "
                 "has none, so the host figures are the device figures)" if not torch.cuda.is_available() else "")
    return "\n".join(l for l in lines if l)

"""The ``quant`` stage of an experiment: quantize, check, report what it costs and buys."""

from __future__ import annotations

import time
from typing import Dict

import torch

from compress.errors import ShortfallError


@torch.no_grad()
def dense_forward_seconds(model, ids: torch.Tensor, batch_size: int = 1) -> float:
    """One forward of the model over the calibration tokens: the yardstick every time is divided by."""
    t = time.perf_counter()
    for i in range(0, ids.shape[0], batch_size):
        model(input_ids=ids[i:i + batch_size].to(next(model.parameters()).device), use_cache=False)
    return time.perf_counter() - t


def packed_footprint(model, report) -> Dict:
    """Bytes of the model as stored: quantized linears at their bits per weight (codes, scales, zero
    points), every other tensor at its own size; beside the same model in fp32."""
    quantized = {m["name"]: m for m in report.modules}
    from compress.calibration import resolve_targets

    flat = resolve_targets(model).flat() if report.method != "bnb" else {}
    qids = {id(flat[n].weight) for n in quantized if n in flat}
    seen, fp32, stored, qparams = set(), 0, 0.0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        fp32 += p.numel() * 4
        if id(p) not in qids:
            stored += p.numel() * p.element_size()
    for m in report.modules:
        qparams += m["numel"]
        stored += m["numel"] * m["bits_per_weight"] / 8
        if report.method == "bnb":
            fp32 += 0  # bnb weights are not model.parameters() of float size: counted below
    if report.method == "bnb":
        stored = float(model.get_memory_footprint())
        fp32 = None
    return {"footprint_packed_mb": stored / 2**20, "footprint_fp32_mb": fp32 / 2**20 if fp32 else None,
            "quantized_params": qparams,
            "bits_per_weight_model": (stored * 8 / sum(p.numel() for p in _unique(model))) if report.method != "bnb" else None}


def _unique(model):
    seen = set()
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            yield p


def save_bnb(model, tokenizer, save_to) -> Dict:
    """Save a bitsandbytes model with transformers' serialization, with the fingerprint of its weights."""
    from pathlib import Path

    from compress.calibration import resolve_targets
    from compress.quant.export import weights_fingerprint

    model.save_pretrained(save_to, safe_serialization=True)
    tokenizer.save_pretrained(save_to)
    return {"format": "safetensors (bitsandbytes), written by the quant stage before any forward",
            "path": str(save_to), "bytes": sum(p.stat().st_size for p in Path(save_to).glob("*.safetensors")),
            "fingerprint": weights_fingerprint(model, resolve_targets(model).qualified_names())}


def check_joint(model, report, cfg, pattern) -> None:
    """After the joint one-pass mode: every quantized weight on its grid and the N:M pattern exact (the
    prune stage has checked the sparsity of every module)."""
    from compress.calibration import resolve_targets, weight_matrix
    from compress.config import parse_pattern
    from compress.quant.engine import check_on_grid, check_zeros
    from compress.quant.grid import GridSpec

    targets = resolve_targets(model, cfg.targets, cfg.ignore)
    flat = targets.flat()
    full = dict(zip(flat, targets.qualified_names()))
    weights = {n: weight_matrix(m) for n, m in flat.items()}
    nm = parse_pattern(pattern) if pattern and pattern != "unstructured" else None
    zeros = {n: (w == 0).cpu() for n, w in weights.items() if full[n] in report.params}
    report.check = check_zeros(model, zeros, nm, weights)
    report.check.update(check_on_grid(report, GridSpec(cfg.bits, cfg.symmetric, cfg.group_size), weights, full))
    report.check["ok"] = report.check["ok"] and report.check["on_grid"] and len(zeros) == len(report.modules) > 0
    if not report.check["ok"]:
        raise ShortfallError(f"quant (joint): {len(report.modules)} modules quantized in the prune stage; check "
                             f"failed: {report.check}", report=report)


def quant_stage(ctx, info: Dict):
    from compress.data import load_calibration
    from compress.quant.engine import quantize_model

    cfg, calib = ctx.cfg.quant, ctx.cfg.calib
    pattern = ctx.cfg.prune.pattern if ctx.cfg.prune.method != "none" else None
    ids, cal_info = load_calibration(ctx.tokenizer, calib.source, calib.nsamples, calib.seqlen, calib.seed,
                                     calib.text_field)
    fwd = dense_forward_seconds(ctx.model, ids, calib.batch_size)
    info["forward_seconds"] = round(fwd, 3)  # the yardstick: this model's forward over the calibration tokens
    t0 = time.perf_counter()
    try:
        if cfg.joint:
            model, report = ctx.model, ctx.artifacts.get("joint_quant_report")
            if report is None:
                raise RuntimeError("quant.joint=true but the prune stage left no joint quantization report")
            check_joint(model, report, cfg, pattern)
            info["joint"] = "quantized in the prune stage's column loop (its seconds are the prune stage's)"
        else:
            model, report = quantize_model(ctx.model, ctx.tokenizer, cfg, calib, device=ctx.device, calib_ids=ids,
                                           pattern=pattern)
    except ShortfallError as e:
        if e.report is not None:
            ctx.record.data["quant_report"] = e.report.to_dict()
            info["check"] = e.report.check
        raise
    seconds = report.seconds if cfg.joint else time.perf_counter() - t0
    report.calibration = cal_info if report.mode.get("chosen") in ("single_pass", "two_pass") else {}
    sizes = packed_footprint(model, report)
    info.update(report.summary())
    info.update(sizes, x_forward=round(seconds / fwd, 3), check=report.check)
    ctx.record.data["quant_report"] = report.to_dict()
    ctx.record.data["metrics"].update({k: v for k, v in sizes.items() if v is not None})
    ctx.record.data["metrics"]["bits_per_weight"] = report.summary()["bits_per_weight_quantized"]
    ctx.record.data["metrics"]["quant_check"] = report.check
    ctx.record.save()
    ctx.artifacts["quant_report"] = report
    order = list(ctx.cfg.stages)
    last = not any(getattr(ctx.cfg, st).method != "none" for st in order[order.index("quant") + 1:])
    if cfg.method == "bnb" and ctx.cfg.output.save_model and last:
        # bitsandbytes on CPU repacks a 4-bit layer at its first forward (the double-quantized absmax
        # becomes bfloat16) and packs it back, not bit for bit, when saved: so the checkpoint is written
        # now, before any forward. A reload then computes exactly what this model computes.
        ctx.artifacts["bnb_saved"] = save_bnb(model, ctx.tokenizer, ctx.out_dir / "model")
    print(report.table())
    return model

"""The quant stage: RTN, GPTQ (through the shared block loop and OBS column loop) and bitsandbytes.

RTN and GPTQ write the dequantized weights into the model (every quantized weight lies exactly on its
grid; the grid parameters are kept for saving), so the in-memory model computes what the saved one
will. A pruned model's zeros (and N:M pattern) are kept: each linear that already has real zeros is
quantized with those weights fixed at zero, and the stage checks 100% of them afterwards. bitsandbytes
swaps the selected linears for its own (see :mod:`compress.quant.bnb`).

Refuses before any work when the selection is empty or holds modules it cannot quantize; fails after
it when fewer modules were quantized than selected, or when a zero or an N:M group broke.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from compress.calibration import resolve_targets, weight_matrix
from compress.calibration.loop import BlockLoop
from compress.config import CalibConfig, QuantConfig, parse_pattern
from compress.errors import ShortfallError, UnsupportedModelError
from compress.pruning.masks import check_nm
from compress.quant.grid import GridSpec
from compress.quant.methods import Quantized, get_method

SPARSE_MIN = 0.01  # a linear with more exact zeros than this is treated as pruned: its zeros are kept


def bits_per_weight(spec: GridSpec, in_features: int, scale_bits: int = 32) -> float:
    """Storage bits per weight of a packed linear: the code, plus its share of the scale (float32 here)
    and, when asymmetric, of the zero point (``bits`` packed)."""
    group = in_features if spec.group_size == -1 else spec.group_size
    return spec.bits + (scale_bits + (0 if spec.symmetric else spec.bits)) / group


@dataclass
class QuantReport:
    method: str
    bits: int
    group_size: int
    symmetric: bool
    modules: List[Dict] = field(default_factory=list)
    mode: Dict = field(default_factory=dict)
    calibration: Dict = field(default_factory=dict)
    check: Dict = field(default_factory=dict)
    targets: Dict = field(default_factory=dict)
    seconds: float = 0.0
    params: Dict[str, tuple] = field(default_factory=dict, repr=False)  # full name -> (scale, zero), for saving

    def summary(self) -> Dict:
        errs = [m["rel_error"] for m in self.modules if m.get("rel_error") is not None]
        qn = sum(m["numel"] for m in self.modules)
        bpw = (sum(m["bits_per_weight"] * m["numel"] for m in self.modules) / qn) if qn else None
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "modules": len(self.modules), "quantized_params": qn, "bits_per_weight_quantized": bpw,
                "mean_rel_error": sum(errs) / len(errs) if errs else None, "quant_seconds": round(self.seconds, 3),
                "mode": self.mode.get("chosen"), "check_ok": self.check.get("ok")}

    def to_dict(self) -> Dict:
        return {"summary": self.summary(), "mode": self.mode, "targets": self.targets, "check": self.check,
                "calibration": self.calibration, "modules": self.modules}

    def table(self, max_rows: int = 10) -> str:
        s = self.summary()
        bpw = f"{s['bits_per_weight_quantized']:.3f}" if s["bits_per_weight_quantized"] else "-"
        lines = [f"quant: {self.method} w{self.bits} {'g' + str(self.group_size) if self.group_size != -1 else 'per-channel'}"
                 f" {'sym' if self.symmetric else 'asym'}: {len(self.modules)} modules, {bpw} bits/weight, "
                 f"{self.seconds:.1f}s"]
        errs = [m for m in self.modules if m.get("rel_error") is not None]
        step = max(1, len(errs) // max_rows)
        for m in errs[::step]:
            lines.append(f"  {m['name']:<32} rel err {m['rel_error']:.4f}"
                         + (f"  damping x{10 ** m['damping']['raised']}" if m.get("damping") else ""))
        return "\n".join(lines)


def _keep_mask(w: torch.Tensor) -> Optional[torch.Tensor]:
    zeros = w == 0
    return ~zeros if float(zeros.float().mean()) > SPARSE_MIN else None


def check_zeros(model: nn.Module, before: Dict[str, torch.Tensor], nm=None, weights=None) -> Dict:
    """Every weight that was zero before the stage still zero, and the N:M pattern intact, in 100% of
    the recorded modules. ``weights``: name -> [out, in] weights to check (default: the model's)."""
    from compress.calibration import resolve_targets as _rt

    lin = weights or {n: weight_matrix(m) for n, m in _rt(model).flat().items()}
    broken, nm_bad, groups = [], [], 0
    for name, zero in before.items():
        w = lin[name]
        if bool((w[zero.to(w.device)] != 0).any()):
            broken.append(name)
        if nm is not None:
            groups += w.shape[0] * (w.shape[1] // nm[1])
            if not check_nm(w, *nm):
                nm_bad.append(name)
    return {"modules_with_zeros": len(before), "zeros": int(sum(int(z.sum()) for z in before.values())),
            "zeros_kept": not broken, "broken": broken[:10], "nm_pattern": f"{nm[0]}:{nm[1]}" if nm else None,
            "nm_groups": groups if nm else None, "nm_exact": (not nm_bad) if nm else None,
            "ok": not broken and not nm_bad}


def record_module(report: QuantReport, spec: GridSpec, key: str, full_name: str, mod: nn.Module, w_dense: torch.Tensor,
                  q: Quantized, stats, kept_zeros: bool, seconds: float) -> None:
    """The report's entry for one quantized linear (``key``: ``"<block>.<name>"``) and its grid
    parameters (for saving)."""
    err = stats.relative_error(w_dense, q.weight) if stats is not None else None
    report.params[full_name] = (q.scale.cpu(), None if q.zero is None else q.zero.cpu())
    report.modules.append({"name": key, "type": type(mod).__name__, "rows": w_dense.shape[0], "cols": w_dense.shape[1],
                           "numel": w_dense.numel(), "bits_per_weight": bits_per_weight(spec, w_dense.shape[1]),
                           "rel_error": err, "kept_zeros": kept_zeros, "seconds": round(seconds, 4), **q.info})


@torch.no_grad()
def check_on_grid(report: QuantReport, spec: GridSpec, weights: Dict[str, torch.Tensor], full: Dict[str, str]) -> Dict:
    """Every quantized weight equals its own code dequantized: what a packed checkpoint will hold."""
    from compress.quant.grid import dequantize, expand, quantize

    off = []
    for name, w in weights.items():
        if full[name] not in report.params:
            continue
        scale, zero = report.params[full[name]]
        # exact in float32; a 16-bit model holds the grid values rounded to its dtype
        rtol = 0.0 if w.dtype == torch.float32 else torch.finfo(w.dtype).eps
        w = w.detach().float().cpu()
        s, z = expand(scale, spec, w.shape[1]), expand(zero, spec, w.shape[1])
        deq = dequantize(quantize(w, s, z, spec.bits), s, z)
        if not (torch.equal(deq, w) if rtol == 0 else torch.allclose(deq, w, rtol=rtol, atol=0)):
            off.append(name)
    return {"on_grid": not off, "off_grid": off[:10]}


@torch.no_grad()
def quantize_model(model: nn.Module, tokenizer, cfg: QuantConfig, calib: Optional[CalibConfig] = None, device=None,
                   calib_ids: Optional[torch.Tensor] = None, pattern: Optional[str] = None, progress: bool = True):
    """Quantize ``model`` (RTN, GPTQ: in place; bnb: a new model) and return ``(model, QuantReport)``.
    ``pattern``: the N:M pattern of an earlier prune stage, checked after quantization."""
    t0 = time.perf_counter()
    calib = calib or CalibConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    targets = resolve_targets(model, cfg.targets, cfg.ignore).require("quantize")
    nm = parse_pattern(pattern) if pattern and pattern != "unstructured" else None
    report = QuantReport(cfg.method, cfg.bits, cfg.group_size, cfg.symmetric)
    report.targets = {"model_class": targets.model_class, "targets": list(targets.patterns),
                      "ignore": list(targets.ignore), "modules": len(targets)}
    flat = targets.flat()
    full = dict(zip(flat, targets.qualified_names()))
    zeros_before = {}
    for name, mod in flat.items():
        w = weight_matrix(mod)
        if _keep_mask(w) is not None:
            zeros_before[name] = (w == 0).cpu()

    if cfg.method == "bnb":
        model = _bnb(model, cfg, targets, report, device)
        from compress.quant.bnb import dequantized_weight

        weights = {n: dequantized_weight(model.get_submodule(full[n])) for n in flat}
    else:
        method = get_method(cfg.method, cfg)
        bad = [f"{n} ({m.in_features if hasattr(m, 'in_features') else weight_matrix(m).shape[1]} inputs)"
               for n, m in flat.items() if cfg.group_size != -1 and weight_matrix(m).shape[1] % cfg.group_size]
        if bad:
            raise UnsupportedModelError(f"quant.group_size={cfg.group_size} does not divide the input width of {bad[:6]}")

        def quantize_linear(bidx: int, name: str, mod: nn.Module, stats):
            t = time.perf_counter()
            w = weight_matrix(mod)
            w_dense = w.detach().float()
            keep = _keep_mask(w_dense)
            q: Quantized = method.quantize(w_dense, stats, keep)
            # recorded before the copy: w_dense may be the stored weight itself (float32 .float() is a no-op)
            record_module(report, method.spec, f"{bidx}.{name}", full[f"{bidx}.{name}"], mod, w_dense, q, stats,
                          kept_zeros=keep is not None, seconds=time.perf_counter() - t)
            w.data.copy_(q.weight.to(w.dtype))

        if method.needs_calibration:
            if calib_ids is None:
                from compress.data import load_calibration

                calib_ids, report.calibration = load_calibration(tokenizer, calib.source, calib.nsamples, calib.seqlen,
                                                                 calib.seed, calib.text_field)
            else:
                report.calibration = {"nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
                                      "given": True}
            loop = BlockLoop(model, targets, method, quantize_linear, sequential=cfg.sequential,
                             memory_budget=cfg.memory_budget, device=device, offload=cfg.offload,
                             batch_size=calib.batch_size, progress=progress, desc=f"quant {cfg.method}", stage="quant")
            report.mode = loop.run(calib_ids)
        else:
            for i, n, m in targets.items():
                quantize_linear(i, n, m, None)
        weights = {n: weight_matrix(m) for n, m in flat.items()}
        done = {m["name"] for m in report.modules}
        missing = [n for n in flat if n not in done]
        if missing:
            raise ShortfallError(f"quantize: {targets.describe()}: quantized {len(done)} of the {len(flat)} selected "
                                 f"modules (never reached by the calibration forward: {missing[:6]})", report=report)
    report.check = check_zeros(model, zeros_before, nm, weights)
    if cfg.method != "bnb":
        report.check.update(check_on_grid(report, GridSpec(cfg.bits, cfg.symmetric, cfg.group_size), weights, full))
        report.check["ok"] = report.check["ok"] and report.check["on_grid"]
    report.seconds = time.perf_counter() - t0
    if not report.check["ok"]:
        raise ShortfallError(f"quantize: the pruned model's zeros or N:M pattern broke: {report.check}", report=report)
    return model, report


def _bnb(model, cfg: QuantConfig, targets, report: QuantReport, device) -> nn.Module:
    from compress.quant.bnb import bnb_config, bnb_modules, bnb_quantize, skip_modules

    names = targets.qualified_names()
    non_linear = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if non_linear:
        raise UnsupportedModelError(f"bitsandbytes replaces nn.Linear only; selected but not nn.Linear: {non_linear[:6]}")
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.bnb_compute_dtype]
    config = bnb_config(cfg.bits, cfg.bnb_quant_type, cfg.bnb_double_quant, compute, cfg.bnb_int8_threshold,
                        skip_modules(model, names))
    dtype = next(model.parameters()).dtype
    q = bnb_quantize(model, config, str(device), dtype)
    got = set(bnb_modules(q))
    missing = [n for n in names if n not in got]
    if missing:
        raise ShortfallError(f"bitsandbytes quantized {len(got)} of the {len(names)} selected linears; not: {missing[:6]}",
                             report=report)
    for n in names:
        report.modules.append({"name": n, "type": type(q.get_submodule(n)).__name__,
                               "numel": int(model.get_submodule(n).weight.numel()),
                               "bits_per_weight": _bnb_bits(cfg), "rel_error": None})
    report.mode = {"chosen": "bitsandbytes", "config": config.to_dict()}
    return q


def _bnb_bits(cfg: QuantConfig) -> float:
    """Storage bits per weight: int8 with one float32 scale per row (counted per row elsewhere: ~8);
    4-bit with a float32 absmax per 64 weights, or with double quantization an 8-bit absmax per 64 and a
    float32 per 256 blocks."""
    if cfg.bits == 8:
        return 8.0
    return 4 + (8 / 64 + 32 / (64 * 256) if cfg.bnb_double_quant else 32 / 64)

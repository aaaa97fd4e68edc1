"""The quant stage: quantize the selected linears, check, report what it costs and buys, and save in a
format stock ``from_pretrained`` reloads.

Grid quantizers (RTN, GPTQ, the joint SparseGPT + GPTQ) write the dequantized weights into the model
(every quantized weight lies exactly on its grid; the grid parameters are kept for saving), so the
in-memory model computes what the saved one will. A pruned model's zeros (and N:M pattern) are kept: each
linear that already has real zeros is quantized with those weights held at zero, and the stage checks
100% of them afterwards. Block transforms (``transform=awq``) run inside the same block loop, before each
block's statistics. bitsandbytes swaps the selected linears for its own modules.

Refuses before any work when the selection is empty or holds modules it cannot quantize; fails after
it when fewer modules were quantized than selected, when a zero or an N:M group broke, or when a weight
is off its grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from compress.calibration.checkpoint import walk_checkpoints
from compress.calibration.targets import resolve_targets
from compress.core.errors import ConfigError, ShortfallError, UnsupportedModelError
from compress.core.activations import attach, observe_static, static_scales
from compress.core.grid import ActSpec, GridSpec
from compress.core.masks import check_nm
from compress.core.modules import dense_weight, unique_parameters, weight_matrix
from compress.data import load_calibration
from compress.quant.base import ModelQuantizer
from compress.quant.export import save_compressed_tensors, sparsity_sidecar, storage_format
from compress.registry import get, spec_of
from compress.schema import CalibConfig
from compress.speed import dense_forward_seconds
from compress.stages.base import DiskSaver, PretrainedSaver, StageContext, StageResult
from compress.stages.engine import linear_pass
from compress.pruning.schedule import layer_sparsities
from compress.stages.prune import achieved_sparsity, verify_sparsity


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
    transforms: List[Dict] = field(default_factory=list)
    prepared: Dict[str, Dict] = field(default_factory=dict)  # what a whole-model transform did (a rotation)
    activations: Dict = field(default_factory=dict)  # 8-bit input activations: format, modules, static scales
    bits_label: str = ""  # W8A8, W4A16, FP8, ...
    walk: Dict = field(default_factory=dict)  # resumed_at (first block computed when resumed), checkpoint seconds
    layer_sparsities: Optional[List[float]] = None  # a quantizer that chooses a mask: its schedule
    seconds: float = 0.0
    params: Dict[str, tuple] = field(default_factory=dict, repr=False)  # full name -> (scale, zero), for saving
    spec: Optional[GridSpec] = field(default=None, repr=False)
    act: Optional[ActSpec] = field(default=None, repr=False)
    act_scales: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)  # static: full name -> scale

    def summary(self) -> Dict:
        errs = [m["rel_error"] for m in self.modules if m.get("rel_error") is not None]
        qn = sum(m["numel"] for m in self.modules)
        bpw = (sum(m["bits_per_weight"] * m["numel"] for m in self.modules) / qn) if qn else None
        out = {"method": self.method, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
               "modules": len(self.modules), "quantized_params": qn, "bits_per_weight_quantized": bpw,
               "mean_rel_error": sum(errs) / len(errs) if errs else None, "quant_seconds": round(self.seconds, 3),
               "mode": self.mode.get("chosen"), "check_ok": self.check.get("ok"), "bits_label": self.bits_label or None,
               "weight_type": self.spec.type if self.spec is not None else None,
               "activations": self.act.label() if self.act is not None else "none"}
        if self.transforms or self.prepared:
            out["transforms"] = sorted({t["transform"] for t in self.transforms} | set(self.prepared))
        if self.walk.get("resumed_at") is not None:
            out["resumed_at_block"] = self.walk["resumed_at"]
        if any("target" in m for m in self.modules):  # a quantizer that also chose a mask (the joint method)
            out["achieved_sparsity"] = achieved_sparsity(self.modules)
        return out

    def to_dict(self) -> Dict:
        return {"summary": self.summary(), "mode": self.mode, "walk": self.walk, "targets": self.targets,
                "activations": self.activations, "prepared": self.prepared,
                "check": self.check, "calibration": self.calibration, "transforms": self.transforms,
                "layer_sparsities": self.layer_sparsities, "modules": self.modules}

    def table(self, max_rows: int = 10) -> str:
        s = self.summary()
        bpw = f"{s['bits_per_weight_quantized']:.3f}" if s["bits_per_weight_quantized"] else "-"
        g = ('g' + str(self.group_size) if self.group_size > 0 else 'per-channel' if self.group_size == -1
             else 'per-tensor')
        w = f"w{self.bits}" if self.spec is None or self.spec.type == "int" else "fp8"
        a = f" ({self.bits_label}; activations {self.act.label()})" if self.act is not None else (
            f" ({self.bits_label})" if self.bits_label else "")
        lines = [f"quant: {self.method} {w} {g} {'sym' if self.symmetric else 'asym'}{a}: {len(self.modules)} modules, {bpw} bits/weight, "
                 f"{self.seconds:.1f}s" + (f", sparsity {s['achieved_sparsity']:.4f}" if "achieved_sparsity" in s else "")]
        errs = [m for m in self.modules if m.get("rel_error") is not None]
        step = max(1, len(errs) // max_rows)
        for m in errs[::step]:
            lines.append(f"  {m['name']:<32} rel err {m['rel_error']:.4f}"
                         + (f"  damping x{10 ** m['damping']['raised']}" if m.get("damping") else ""))
        return "\n".join(lines)


def check_zeros(before: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor], nm=None) -> Dict:
    """Every weight that was zero before the stage still zero, and the N:M pattern intact, in 100% of
    the recorded modules (``weights``: name -> the ``[out, in]`` weights after the stage)."""
    broken, nm_bad, groups = [], [], 0
    for name, zero in before.items():
        w = weights[name]
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


def checks_from_entries(modules: List[Dict], nm=None) -> Dict:
    """:func:`check_zeros` from the engine's per-linear entries (``zeros_before``, ``zeros_kept``, ``nm_kept``),
    which were checked while each block was loaded."""
    had = [m for m in modules if m.get("zeros_before")]
    broken = [m["name"] for m in had if not m.get("zeros_kept")]
    nm_bad = [m["name"] for m in had if nm is not None and not m.get("nm_kept")]
    return {"modules_with_zeros": len(had), "zeros": sum(m["zeros_before"] for m in had),
            "zeros_kept": not broken, "broken": broken[:10], "nm_pattern": f"{nm[0]}:{nm[1]}" if nm else None,
            "nm_groups": sum(m["rows"] * (m["cols"] // nm[1]) for m in had) if nm else None,
            "nm_exact": (not nm_bad) if nm else None, "ok": not broken and not nm_bad}


@torch.no_grad()
def quantize_model(model: nn.Module, tokenizer, cfg, calib: Optional[CalibConfig] = None, device=None,
                   calib_ids: Optional[torch.Tensor] = None, nm=None, transforms=(), progress: bool = True,
                   checkpoint_dir=None, store=None):
    """Quantize ``model`` with the quantizer ``cfg`` names (grid quantizers: in place; bitsandbytes: a new
    model) and return ``(model, QuantReport)``. ``nm``: the N:M pattern of an earlier prune stage, checked
    after quantization. ``transforms``: block transforms (their configs) run before each block's
    statistics. ``checkpoint_dir``: the block walk checkpoints every block there and resumes from it."""
    t0 = time.perf_counter()
    calib = calib or CalibConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    method = spec_of(cfg).impl(cfg)
    targets = resolve_targets(model, cfg.targets, cfg.ignore).require("quantize")
    report = QuantReport(cfg.method, cfg.bits, getattr(cfg, "group_size", -1), getattr(cfg, "symmetric", True))
    report.targets = {"model_class": targets.model_class, "targets": list(targets.patterns),
                      "ignore": list(targets.ignore), "modules": len(targets)}
    flat = targets.flat()
    full = dict(zip(flat, targets.qualified_names()))

    if isinstance(method, ModelQuantizer):
        zeros_before = {n: (weight_matrix(m) == 0).cpu() for n, m in flat.items()
                        if float((weight_matrix(m) == 0).float().mean()) > 0.01}
        model = method.quantize(model, list(full.values()), device)
        bpw = cfg.bits_per_weight()
        report.modules = [{"name": full[n], "type": type(model.get_submodule(full[n])).__name__,
                           "numel": int(flat[n].weight.numel()), "bits_per_weight": bpw, "rel_error": None} for n in flat]
        report.mode = {"chosen": "bitsandbytes", "config": method.config.to_dict()}
        weights = {n: dense_weight(model.get_submodule(full[n])) for n in flat}
        report.check = check_zeros(zeros_before, weights, nm)
    else:
        bad = [f"{n} ({weight_matrix(m).shape[1]} inputs)" for n, m in flat.items()
               if cfg.group_size > 0 and weight_matrix(m).shape[1] % cfg.group_size]
        if bad:
            raise UnsupportedModelError(f"quant.group_size={cfg.group_size} does not divide the input width of {bad[:6]}")
        tfs = [get("transform", t.method).impl(t, method.spec, act=cfg.act) for t in transforms]
        for t in tfs:  # a whole-model transform (a rotation) acts here; block transforms get the block structure
            info = t.prepare(model)
            if info:
                report.prepared[t.name] = info
        act = cfg.act
        needs_calib = (method.needs_calibration or any(getattr(t, "needs_calibration", True) for t in tfs)
                       or (act is not None and not act.dynamic))
        if needs_calib and calib_ids is None:
            calib_ids, report.calibration = load_calibration(tokenizer, calib.source, calib.nsamples, calib.seqlen,
                                                             calib.seed, calib.text_field)
        elif needs_calib:
            report.calibration = {"nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), "given": True}
        own_nm = getattr(cfg, "nm", None)  # a quantizer that also chooses an N:M mask (the joint method)
        sparsities = None
        if hasattr(cfg, "schedule"):  # its own per-block sparsity, as a prune stage's
            sparsities = layer_sparsities(cfg, len(targets.per_block), model=model, calib_ids=calib_ids,
                                          batch_size=calib.batch_size, device=device, offload=cfg.offload,
                                          progress=progress)
            report.layer_sparsities = sparsities if cfg.schedule != "uniform" else None
        nm = nm or own_nm
        done = linear_pass(model, method, cfg, targets, calib_ids if needs_calib else None,
                           sparsities=sparsities, nm=own_nm, batch_size=calib.batch_size,
                           device=device, transforms=[t for t in tfs if getattr(t, "needs_calibration", True)],
                           progress=progress, desc=f"quant {cfg.method}", stage="quant",
                           checkpoints=walk_checkpoints(checkpoint_dir, calib_ids if needs_calib else None,
                                                        len(targets.per_block)), store=store, check_pattern=nm)
        report.modules, report.mode, report.params, report.spec = done.modules, done.mode, done.params, done.spec
        report.transforms = done.transforms
        report.walk = done.walk
        missing = [n for n in flat if n not in {m["name"] for m in report.modules}]
        if missing:
            raise ShortfallError(f"quantize: {targets.describe()}: quantized {len(flat) - len(missing)} of the "
                                 f"{len(flat)} selected modules (never reached by the calibration forward: "
                                 f"{missing[:6]})", result=report)
        report.check = checks_from_entries(report.modules, nm)
        if act is not None:  # 8-bit input activations, simulated by a pre-hook on every quantized linear
            names = [full[n] for n in flat]
            t1 = time.perf_counter()
            amax = None if act.dynamic else observe_static(model, names, calib_ids, calib.batch_size, device)
            report.act_scales = None if amax is None else static_scales(amax, act)
            n = attach(model, names, act, report.act_scales)
            report.act = act
            report.activations = {"format": act.label(), "type": act.type, "strategy": act.strategy,
                                  "dynamic": act.dynamic, "bits": act.bits, "modules": n,
                                  "simulated": "quantize-dequantize the input, matmul in float",
                                  "calibration_seconds": round(time.perf_counter() - t1, 3)}
            if amax is not None:
                vals = torch.stack(list(amax.values()))
                report.activations.update(static_amax_min=float(vals.min()), static_amax_max=float(vals.max()))
            if n != len(flat):
                raise ShortfallError(f"quantize: activation quantization attached to {n} of {len(flat)} linears",
                                     result=report)
        report.bits_label = cfg.bits_label()
    if any("target" in m for m in report.modules):  # the joint method: its own sparsity target, as a prune stage
        sp = verify_sparsity(report.modules, cfg.pattern, list(flat))
        report.check.update(sparsity=sp)
        report.check["ok"] = report.check["ok"] and sp["ok"]
    if report.spec is not None:
        off = [m["name"] for m in report.modules if not m.get("on_grid", False)]
        report.check.update(on_grid=not off, off_grid=off[:10])
        report.check["ok"] = report.check["ok"] and report.check["on_grid"]
    report.seconds = time.perf_counter() - t0
    if not report.check["ok"]:
        raise ShortfallError(f"quantize: the check failed (zeros kept, N:M, sparsity target, on grid): {report.check}",
                             result=report)
    return model, report


def packed_footprint(model: nn.Module, report: QuantReport) -> Dict:
    """Bytes of the model as stored: quantized linears at their bits per weight (codes, scales, zero
    points), every other tensor at its own size; beside the same model in fp32."""
    if report.method == "bnb":
        return {"footprint_packed_mb": float(model.get_memory_footprint()) / 2**20, "footprint_fp32_mb": None,
                "quantized_params": sum(m["numel"] for m in report.modules), "bits_per_weight_model": None}
    flat = resolve_targets(model).flat()
    qids = {id(flat[m["name"]].weight) for m in report.modules if m["name"] in flat}
    fp32 = stored = 0.0
    params = list(unique_parameters(model))
    for p in params:
        fp32 += p.numel() * 4
        if id(p) not in qids:
            stored += p.numel() * p.element_size()
    stored += sum(m["numel"] * m["bits_per_weight"] / 8 for m in report.modules)
    return {"footprint_packed_mb": stored / 2**20, "footprint_fp32_mb": fp32 / 2**20,
            "quantized_params": sum(m["numel"] for m in report.modules),
            "bits_per_weight_model": stored * 8 / sum(p.numel() for p in params)}


class CompressedTensorsSaver:
    """RTN / GPTQ / joint models as compressed-tensors ``pack-quantized`` (integer codes, scales, zero
    points), with the sparsity sidecar; stock ``from_pretrained`` reloads them."""

    format = "compressed-tensors pack-quantized"

    def __init__(self, report: QuantReport, targets, ignore, pattern: Optional[str]):
        self.params, self.targets, self.ignore, self.pattern = report.params, targets, ignore, pattern
        s = report.spec
        self.spec = GridSpec(s.bits, s.symmetric, s.group_size, type=s.type)
        self.act, self.act_scales = report.act, report.act_scales
        self.format = "compressed-tensors " + storage_format(self.spec, self.act)

    def save(self, model, tokenizer, out_dir: Path) -> Dict:
        flat = resolve_targets(model, self.targets, self.ignore)
        weights = {n: weight_matrix(m).detach() for n, m in zip(flat.qualified_names(), flat.flat().values())}
        return save_compressed_tensors(model, out_dir, self.params, self.spec, tokenizer,
                                       sidecar=sparsity_sidecar(weights, self.pattern), act=self.act,
                                       act_scales=self.act_scales)


class DequantizedSaver(PretrainedSaver):
    """The working alternative when a packed checkpoint does not reload: the dequantized weights with
    ``save_pretrained`` (they are exactly the grid values) and the quantization recorded beside them in
    ``compress_quantization.json`` (bits, group size, symmetry, per-module scale shapes)."""

    format = "safetensors (dequantized grid values; quantization in compress_quantization.json)"

    def __init__(self, report: QuantReport):
        self.report = report

    def save(self, model, tokenizer, out_dir: Path) -> Dict:
        out = super().save(model, tokenizer, out_dir)
        write_quantization_json(self.report, out_dir)
        return dict(out, format=self.format)


def write_quantization_json(report: QuantReport, out_dir: Path) -> None:
    import json

    s = report.spec
    (Path(out_dir) / "compress_quantization.json").write_text(json.dumps(
        {"method": report.method, "bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric,
         "type": s.type, "bits_label": report.bits_label,
         # the 8-bit input activations the run simulated: this dequantized checkpoint does not apply them
         "input_activations": report.activations or None,
         "modules": {n: list(sc.shape) for n, (sc, _) in report.params.items()}}, indent=1))


def _r(x, nd: int = 3):
    return round(x, nd) if x is not None else None


class DiskDequantizedSaver(DiskSaver):
    """A model quantized block by block from disk: its shards hold the dequantized grid values (stock
    ``from_pretrained`` reads them); the quantization (bits, group size, symmetry, scale shapes) is in
    ``compress_quantization.json``. Packing into compressed-tensors from disk is not implemented yet."""

    format = "safetensors (sharded, dequantized grid values; quantization in compress_quantization.json)"

    def __init__(self, weights: Path, report: QuantReport):
        super().__init__(weights)
        self.report = report

    def save(self, model, tokenizer, out_dir: Path) -> Dict:
        out = super().save(model, tokenizer, out_dir)
        write_quantization_json(self.report, out_dir)
        return dict(out, format=self.format)


class QuantStage:
    """``quant=<quantizer>`` (with ``transform=<block transform>``): see the module docstring."""

    name = "quant"

    @staticmethod
    def ranks_refusal(cfg) -> str:
        """Several ranks (torch.distributed): supported."""
        return ""

    @staticmethod
    def precheck(cfg, meta) -> None:
        """Before any weight is read: a grid's group size must divide the input width of every selected linear
        (widths from the model built on the meta device)."""
        q = cfg.quant
        if getattr(q, "group_size", -1) <= 0:
            return
        widths = {n: weight_matrix(m).shape[1] for n, m in resolve_targets(meta, q.targets, q.ignore).flat().items()}
        bad = sorted({n.split(".", 1)[1]: w for n, w in widths.items() if w % q.group_size}.items())
        if bad:
            ok = [g for g in (16, 32, 64, 128, 256, 512) if all(w % g == 0 for w in widths.values())]
            raise ConfigError(f"quant.group_size={q.group_size} does not divide the input width of "
                              + ", ".join(f"{n} ({w})" for n, w in bad[:8])
                              + f". Group sizes that divide every width: {ok or 'none'}; or -1 (per channel).")

    @staticmethod
    def disk_precheck(cfg) -> None:
        """model.load=disk: quantizers that swap modules for their own (bitsandbytes) need the model in memory."""
        if issubclass(spec_of(cfg.quant).impl, ModelQuantizer):
            raise ConfigError(f"quant={cfg.quant.method} replaces the model's modules as a whole, which needs the model "
                              "in memory; with model.load=disk use a grid quantizer (`compress list` shows them)")
        tf = cfg.transform
        if tf.method != "none" and getattr(get("transform", tf.method).impl, "whole_model", False):
            raise ConfigError(f"transform={tf.method} transforms the whole model at once (embeddings, every block, the "
                              "head), which needs it in memory: use model.load=memory")
        if getattr(cfg.quant, "activations", "none") != "none":
            raise ConfigError(f"quant.activations={cfg.quant.activations} (8-bit input activations, simulated by hooks "
                              "on the model in memory) is not supported with model.load=disk yet; use "
                              "model.load=memory, or a weight-only scheme")
        if getattr(cfg.quant, "schedule", "uniform") != "uniform":
            raise ConfigError(f"quant.schedule={cfg.quant.schedule} walks the model twice, which model.load=disk does "
                              "not support yet; use quant.schedule=uniform or model.load=memory")

    def run(self, ctx: StageContext) -> StageResult:
        cfg, calib = ctx.cfg.quant, ctx.cfg.calib
        ids, cal_info = load_calibration(ctx.tokenizer, calib.source, calib.nsamples, calib.seqlen, calib.seed,
                                         calib.text_field)
        store = ctx.disk_store()
        # the yardstick of this stage's time (a dense forward needs the model in memory: none on disk)
        fwd = dense_forward_seconds(ctx.model, ids, calib.batch_size) if store is None else None
        transforms = [ctx.cfg.transform] if ctx.cfg.transform.method != "none" else []
        t0 = time.perf_counter()
        try:
            model, report = quantize_model(ctx.model, ctx.tokenizer, cfg, calib, device=ctx.device, calib_ids=ids,
                                           nm=ctx.facts.nm, transforms=transforms, checkpoint_dir=ctx.checkpoint_dir,
                                           store=store)
        except ShortfallError as e:
            if isinstance(e.result, QuantReport):
                e.result = StageResult(ctx.model, summary={"check": e.result.check, "forward_seconds": _r(fwd)},
                                       sections={"quant_report": e.result.to_dict()})
            raise
        seconds = time.perf_counter() - t0
        report.calibration = cal_info if report.mode.get("chosen") in ("single_pass", "two_pass") else {}
        sizes = packed_footprint(model, report)
        summary = dict(report.summary(), **sizes, forward_seconds=_r(fwd), x_forward=_r(seconds / fwd if fwd else None),
                       check=report.check)
        metrics = {k: v for k, v in sizes.items() if v is not None}
        metrics.update(bits_per_weight=report.summary()["bits_per_weight_quantized"], quant_check=report.check)
        pattern = ctx.facts.pattern or getattr(cfg, "pattern", None)
        weights = ctx.finish_disk(store) if store is not None else None
        if weights is not None:  # written block by block: the grid values, the quantization beside them
            saver = DiskDequantizedSaver(weights, report)
        elif report.spec is not None:
            saver = CompressedTensorsSaver(report, cfg.targets, cfg.ignore, pattern)
            saver.fallback = DequantizedSaver(report)
        else:
            saver = PretrainedSaver()  # bitsandbytes: transformers' own 8/4-bit serialization
        return StageResult(model, summary=summary, sections={"quant_report": report.to_dict()}, metrics=metrics,
                           protocol={"calibration": cal_info} if report.calibration else {},
                           facts={"quantized": True, "nm": ctx.facts.nm or getattr(cfg, "nm", None),
                                  "pattern": pattern},
                           saver=saver, printed=report.table(), weights=weights)

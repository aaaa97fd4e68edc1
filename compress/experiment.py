"""One experiment: load -> the configured stages (``stages``, default prune, train, quant) -> eval, with a run record.

Each stage is a function ``stage(ctx, info)`` registered in :data:`STAGES`; ``info`` is a dict whose
contents go into that stage's entry in ``results.json``. The record is rewritten after every stage,
so a failure in a later stage keeps everything the earlier ones measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from compress.config import Config


@dataclass
class StageContext:
    cfg: Config
    model: Any
    tokenizer: Any
    device: str
    record: Any
    out_dir: Path
    artifacts: Dict = dataclasses.field(default_factory=dict)  # what later steps need (e.g. the quant grids for saving)


def _stage_prune(ctx: StageContext, info: Dict) -> None:
    from compress.errors import ShortfallError
    from compress.pruning import prune_model

    if ctx.cfg.prune.method == "structured":
        from compress.structured.stage import structured_stage

        structured_stage(ctx, info)  # sets ctx.model (the LoRA estimator hands back the merged model)
        return

    def record(report):
        info.update(report.summary())
        if report.mode:
            info["mode"] = report.mode["chosen"]
            info["mode_decision"] = report.mode
        info["check"] = report.check
        ctx.record.data["prune_report"] = report.to_dict()
        ctx.record.data["protocol"]["calibration"] = report.calibration
        print(report.table())

    try:
        report = prune_model(ctx.model, ctx.tokenizer, ctx.cfg.prune, ctx.cfg.calib, device=ctx.device,
                             quant=ctx.cfg.quant if ctx.cfg.quant.joint else None)
        if report.joint_quant is not None:  # the quant stage that follows reports and checks it
            ctx.artifacts["joint_quant_report"] = report.joint_quant
    except ShortfallError as e:  # what it did is recorded before the stage fails
        if e.report is not None:
            record(e.report)
        raise
    record(report)


def _stage_train(ctx: StageContext, info: Dict) -> None:
    from compress.training import train_stage

    ctx.model = train_stage(ctx, info)


def _stage_quant(ctx: StageContext, info: Dict) -> None:
    from compress.quant.stage import quant_stage

    ctx.model = quant_stage(ctx, info)


STAGES: Dict[str, Callable[[StageContext, Dict], None]] = {
    "prune": _stage_prune,
    "train": _stage_train,
    "quant": _stage_quant,
}


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _config_dict(cfg: Config, resolved) -> Dict:
    if resolved is not None:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(resolved, resolve=True)
    return dataclasses.asdict(cfg)


def evaluate_into(ctx: StageContext, label: str = "ppl") -> Dict[str, float]:
    from compress.config import dataset_key
    from compress.evaluate import perplexity

    e = ctx.cfg.eval
    out = {}
    for ds in e.datasets:
        key = dataset_key(ds)
        res = perplexity(ctx.model, ctx.tokenizer, ds, e.seqlen, e.max_windows, e.batch_size, e.add_bos)
        out[key] = res["ppl"]
        ctx.record.data["metrics"].setdefault(label, {})[key] = res["ppl"]
        ctx.record.data["protocol"][key] = dict(res["protocol"], source=ds)
        ctx.record.save()
    return out


def zero_shot_into(ctx: StageContext, info: Dict) -> None:
    from compress.lmeval import zero_shot

    z = ctx.cfg.eval.zero_shot
    res = zero_shot(ctx.model, ctx.tokenizer, z.tasks, z.num_fewshot, z.limit, z.batch_size, z.include_path,
                    seed=ctx.cfg.seed)
    ctx.record.data["metrics"]["zero_shot"] = res["metrics"]
    ctx.record.data["protocol"]["zero_shot"] = res["protocol"]
    info["tasks"] = {t: {k: v for k, v in m.items() if not k.endswith("_stderr")} for t, m in res["metrics"].items()}
    print(zero_shot_table(res["metrics"]))


def zero_shot_table(metrics: Dict) -> str:
    lines = ["  zero-shot (lm-eval):"]
    for task, m in metrics.items():
        vals = ", ".join(f"{k}={v:.4f}" for k, v in m.items() if not k.endswith("_stderr") and v is not None)
        lines.append(f"    {task}: {vals}")
    return "\n".join(lines)


def speed_into(ctx: StageContext, info: Dict) -> None:
    """Prefill throughput on the run's device; with exact 2:4 weights on a capable GPU, also through the
    2:4 sparse kernels (the model is converted in place: this runs last)."""
    from compress.speed import prefill_throughput, semi_structured_available, to_semi_structured

    e = ctx.cfg.eval
    if ctx.artifacts.get("structured"):
        return structured_speed_into(ctx, info)
    res = prefill_throughput(ctx.model, e.speed_batch_size, e.speed_seqlen)
    out = {"tokens_per_s": res["tokens_per_s"], "ms_per_batch": res["ms_per_batch"], "kernels": "dense",
           "batch_size": e.speed_batch_size, "seqlen": e.speed_seqlen, "device": res["device"], "dtype": res["dtype"]}
    dtype = next(ctx.model.parameters()).dtype
    if semi_structured_available(ctx.device) and str(dtype) in ("torch.float16", "torch.bfloat16"):
        converted = to_semi_structured(ctx.model)
        if converted:
            sp = prefill_throughput(ctx.model, e.speed_batch_size, e.speed_seqlen)
            out.update(sparse24_tokens_per_s=sp["tokens_per_s"], sparse24_linears=len(converted),
                       sparse24_speedup=sp["tokens_per_s"] / res["tokens_per_s"])
    ctx.record.data["metrics"]["speed"] = out
    info.update(out)


def structured_speed_into(ctx: StageContext, info: Dict) -> None:
    """Dense and structurally pruned model measured interleaved in this process: prefill tokens/s at batch 1
    and ``eval.speed_batch_size`` (last-position logits), decode tokens/s (batch 1, KV cache, 128 tokens),
    with the analytic FLOP-ratio ceiling beside the measured prefill ratio."""
    from compress.models import load_model
    from compress.speed import serving_speed

    e = ctx.cfg.eval
    dense, _ = load_model(ctx.cfg.model, device=ctx.device)
    res = serving_speed({"dense": dense, "pruned": ctx.model}, batch_sizes=sorted({1, e.speed_batch_size}),
                        seqlen=e.speed_seqlen)
    del dense
    ceiling = ctx.artifacts["structured"]["flop_ratio_ceiling"]  # the stage's, at the same eval.speed_seqlen
    pr = res["models"]["pruned"]
    b = e.speed_batch_size
    out = {"tokens_per_s": pr[f"prefill_b{b}_tokens_per_s"], "batch_size": b, "seqlen": e.speed_seqlen,
           "device": res["device"], "dtype": res["dtype"], "kernels": "dense", "logits": "last position",
           "dense_tokens_per_s": res["models"]["dense"][f"prefill_b{b}_tokens_per_s"],
           "speedup": pr["speedup"], "flop_ratio_ceiling": ceiling,
           "fraction_of_ceiling": {k: v / ceiling for k, v in pr["speedup"].items() if k.startswith("prefill")},
           "detail": res}
    ctx.record.data["metrics"]["speed"] = out
    info.update({k: v for k, v in out.items() if k != "detail"})
    print("  speed (dense -> pruned, interleaved): " + ", ".join(f"{k} {v:.3f}x" for k, v in pr["speedup"].items())
          + f"; FLOP ceiling {ceiling:.3f}x")


def final_evals(ctx: StageContext, save_to: Optional[Path] = None) -> None:
    """Perplexity, then zero-shot tasks, then (optionally) saving, then speed (which may convert the model)."""
    rec, cfg = ctx.record, ctx.cfg
    with rec.stage("eval", "perplexity") as info:
        info["ppl"] = evaluate_into(ctx)
    if cfg.eval.zero_shot.tasks:
        with rec.stage("zero_shot", "lm_eval") as info:
            zero_shot_into(ctx, info)
    if save_to is not None:
        with rec.stage("save", "save_pretrained") as info:
            info.update(save_model(ctx, save_to))
    if cfg.eval.speed:
        with rec.stage("speed", "prefill") as info:
            speed_into(ctx, info)


REUSE_KEY = ("output", "reuse_other_code")  # not part of a cell's identity


def save_model(ctx: StageContext, save_to: Path) -> Dict:
    """Save the final model so that stock ``from_pretrained`` reloads it: RTN/GPTQ as compressed-tensors
    pack-quantized (with the sparsity sidecar), everything else (dense, pruned, bitsandbytes) with
    ``save_pretrained``; safetensors only."""
    report = ctx.artifacts.get("quant_report")
    if "bnb_saved" in ctx.artifacts:  # written by the quant stage, before any forward (see quant_stage)
        return ctx.artifacts["bnb_saved"]
    if report is not None and report.method in ("rtn", "gptq"):
        from compress.calibration import resolve_targets, weight_matrix
        from compress.quant.export import save_compressed_tensors, sparsity_sidecar
        from compress.quant.grid import GridSpec

        q = ctx.cfg.quant
        spec = GridSpec(q.bits, q.symmetric, q.group_size)
        flat = resolve_targets(ctx.model, q.targets, q.ignore)
        weights = {n: weight_matrix(m).detach() for n, m in zip(flat.qualified_names(), flat.flat().values())}
        pattern = ctx.cfg.prune.pattern if ctx.cfg.prune.method != "none" else None
        out = save_compressed_tensors(ctx.model, save_to, report.params, spec, ctx.tokenizer,
                                      sidecar=sparsity_sidecar(weights, pattern))
    else:
        ctx.model.save_pretrained(save_to, safe_serialization=True)
        ctx.tokenizer.save_pretrained(save_to)
        out = {"format": "safetensors" + (" (bitsandbytes)" if report is not None else ""), "path": str(save_to),
               "bytes": sum(p.stat().st_size for p in Path(save_to).glob("*.safetensors"))}
    from compress.calibration import resolve_targets
    from compress.quant.export import weights_fingerprint

    out["fingerprint"] = weights_fingerprint(ctx.model, resolve_targets(ctx.model).qualified_names())
    if ctx.artifacts.get("structured"):
        out["probe"] = save_probe_logits(ctx.model, Path(save_to).parent / "probe_logits.safetensors")
    return out


def save_probe_logits(model, path: Path, batch: int = 2, seqlen: int = 64, keep: int = 8) -> Dict:
    """The in-memory model's logits on fixed random token ids (the last ``keep`` positions), saved beside the
    model so that a reload can be compared logit by logit (``benchmarks/reload_check.py``)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=g)
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(dev), use_cache=False).logits[:, -keep:].float().cpu().contiguous()
    save_file({"ids": ids, "logits": logits}, str(path))
    return {"path": str(path), "ids": [batch, seqlen], "positions": keep}


def check_group_size(cfg: Config) -> None:
    """Before the model loads: a quant group size must divide the input width of every selected linear.
    The widths come from the model built on the meta device from its config (no weights read)."""
    q = cfg.quant
    if q.method not in ("rtn", "gptq") or q.group_size == -1:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.calibration import resolve_targets, weight_matrix
    from compress.config import ConfigError
    from compress.models import model_path

    mc = AutoConfig.from_pretrained(model_path(cfg.model), revision=cfg.model.revision,
                                    trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(mc, trust_remote_code=cfg.model.trust_remote_code)
    widths = {n: weight_matrix(m).shape[1] for n, m in resolve_targets(meta, q.targets, q.ignore).flat().items()}
    bad = sorted({n.split(".", 1)[1]: w for n, w in widths.items() if w % q.group_size}.items())
    if bad:
        ok = [g for g in (16, 32, 64, 128, 256, 512) if all(w % g == 0 for w in widths.values())]
        raise ConfigError(f"quant.group_size={q.group_size} does not divide the input width of "
                          + ", ".join(f"{n} ({w})" for n, w in bad[:8])
                          + f". Group sizes that divide every width: {ok or 'none'}; or -1 (per channel).")


def config_hash(cfg_dict: Dict) -> str:
    """Identity of a cell: the resolved config (nothing about where it runs, nor the reuse switch)."""
    d = json.loads(json.dumps(cfg_dict, default=str))
    (d.get(REUSE_KEY[0]) or {}).pop(REUSE_KEY[1], None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_finished(out_dir: Path, chash: str, sweep_dir: Optional[Path] = None, code: Optional[str] = None,
                  reuse_other_code: bool = False) -> Optional[Path]:
    """A finished run of the same config: in ``out_dir`` or (in a sweep) any cell of the sweep, computed
    by the same code version (``code``, see :func:`compress.record.code_version`) unless
    ``reuse_other_code``. A matching run by other code is reported and re-run."""
    candidates = [out_dir / "results.json"]
    if sweep_dir is not None:
        candidates += sorted(Path(sweep_dir).glob("*/results.json"))
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("status") != "ok" or data.get("config_hash") != chash:
            continue
        if code is None or reuse_other_code or data.get("code_version") == code:
            return path
        print(f"compress: {path.parent} finished this config with code {data.get('code_version')}, not {code}: "
              "running it again (output.reuse_other_code=true reuses it)")
    return None


def _take_lock(path: Path) -> bool:
    """Create ``path`` holding our pid; a lock left by a dead process (a killed sweep) is taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)
                return False  # held by a live process
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)
            except PermissionError:
                return False
    return False


def _dense_baseline(ctx: StageContext, sweep_dir: Path, recipe: Optional[str]) -> None:
    """In a sweep, evaluate the dense model once per model and eval protocol, into ``sweep_dir/dense-<hash>``."""
    from compress.evaluate import flops_metrics, size_metrics
    from compress.record import RunRecord, code_version

    base_cfg = dataclasses.replace(ctx.cfg, prune=type(ctx.cfg.prune)(), train=type(ctx.cfg.train)(),
                                   quant=type(ctx.cfg.quant)(), description="dense baseline of the sweep")
    assert base_cfg.is_dense_baseline()
    base = dataclasses.asdict(base_cfg)
    chash = config_hash({"model": base["model"], "eval": base["eval"]})
    d = Path(sweep_dir) / f"dense-{chash}"
    code = code_version()
    if find_finished(d, chash, code=code, reuse_other_code=ctx.cfg.output.reuse_other_code) is not None:
        return
    d.mkdir(parents=True, exist_ok=True)
    if not _take_lock(d / ".lock"):  # another live worker computes it
        return
    try:
        # with the code version, as every run records it: find_finished compares it, and without it every
        # cell of a sweep evaluated the dense model again
        rec = RunRecord(d, base, device=ctx.device, seed=ctx.cfg.seed, recipe="dense", config_hash=chash,
                        code_version=code, description="dense baseline of the sweep")
        rec.update_metrics(**size_metrics(ctx.model, ctx.cfg.prune.targets, ctx.cfg.prune.ignore),
                           **flops_metrics(ctx.model, ctx.cfg.eval.speed_seqlen))
        sub = dataclasses.replace(ctx, cfg=base_cfg, record=rec, out_dir=d)
        final_evals(sub)
        rec.finish("ok")
    finally:
        os.unlink(d / ".lock")


def run_experiment(cfg: Config, out_dir, recipe: Optional[str] = None, resolved=None, model=None,
                   tokenizer=None, print_summary: bool = True, sweep_dir=None, skip_finished: bool = True) -> Dict:
    """Run the configured stages and return the record (also in ``out_dir/results.json``).

    With ``skip_finished`` a config that already finished (same resolved config hash, status ok) in
    ``out_dir`` or, in a sweep, in another cell of ``sweep_dir``, with the same code version (package
    version and git commit), is not run again; ``output.reuse_other_code=true`` also reuses a run made
    by other code. In a sweep the dense baseline is evaluated once (``sweep_dir/dense-<hash>/``).
    Each stage runs with torch's process-global switches (TF32, cuDNN flags) restored afterwards, so
    that one cell of a one-process sweep cannot change the numerics of the next.
    """
    from compress.evaluate import flops_metrics, size_metrics
    from compress.models import load_model, resolve_device
    from compress.record import RunRecord, code_version, scoped_torch_flags

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = _config_dict(cfg, resolved)
    chash = config_hash(cfg_dict)
    code = code_version()
    if skip_finished:
        done = find_finished(out_dir, chash, sweep_dir, code=code, reuse_other_code=cfg.output.reuse_other_code)
        if done is not None:
            print(f"compress: {recipe or 'run'} already finished in {done.parent} (config {chash}, code "
                  f"{json.loads(done.read_text()).get('code_version')}): skipped")
            return json.loads(done.read_text())
    if model is None:
        check_group_size(cfg)  # before any weight is read
        from compress.structured.stage import check_structured

        check_structured(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.model.device)
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(cfg_dict), out_dir / "config.yaml")
    rec = RunRecord(out_dir, cfg_dict, device=device, seed=cfg.seed, recipe=recipe, description=cfg.description,
                    config_hash=chash, code_version=code)
    try:
        with rec.stage("load", cfg.model.name) as info:
            if model is None:
                model, tokenizer = load_model(cfg.model, device=device)
            info["dtype"] = str(next(model.parameters()).dtype)
        ctx = StageContext(cfg, model, tokenizer, device, rec, out_dir)

        def sizes(m):  # the prune stage's selection; FLOPs at the speed measurement's length
            return {**size_metrics(m, cfg.prune.targets, cfg.prune.ignore), **flops_metrics(m, cfg.eval.speed_seqlen)}

        rec.update_metrics(**sizes(model))
        if sweep_dir is not None and not cfg.is_dense_baseline():
            with scoped_torch_flags():
                _dense_baseline(ctx, Path(sweep_dir), recipe)
        for name in cfg.stages:
            method = getattr(cfg, name).method
            if method == "none":
                continue
            with rec.stage(name, method) as info, scoped_torch_flags():
                STAGES[name](ctx, info)
            rec.update_metrics(**sizes(ctx.model))
        with scoped_torch_flags():
            final_evals(ctx, save_to=out_dir / "model" if cfg.output.save_model else None)
        rec.finish("ok")
    finally:
        if print_summary:
            print(summary_table(rec.data))
    return rec.data


def summary_table(data: Dict) -> str:
    m = data.get("metrics", {})
    lines = [f"== compress run: {data.get('recipe') or 'custom'} ({data.get('status')}) =="]
    for ds, ppl in (m.get("ppl") or {}).items():
        proto = data.get("protocol", {}).get(ds, {})
        lines.append(f"  ppl[{ds}] = {ppl:.3f}   ({proto.get('windows')} x {proto.get('seqlen')} tokens)")
    if "sparsity" in m:
        lines.append(f"  sparsity (prunable linears) = {m['sparsity']:.4f}")
    if "params_total" in m:
        lines.append(f"  params total / non-zero = {m['params_total']:,} / {m['params_nonzero']:,}")
    if "footprint_mb" in m:
        lines.append(f"  footprint = {m['footprint_mb']:.1f} MiB dense storage"
                     + (f", {m['footprint_sparse_mb']:.1f} MiB with sparse storage" if m.get("footprint_sparse_mb") else ""))
    if m.get("bits_per_weight") is not None:
        chk = m.get("quant_check") or {}
        lines.append(f"  quantized: {m['bits_per_weight']:.3f} bits per weight of the quantized linears; packed "
                     f"footprint {m['footprint_packed_mb']:.1f} MiB"
                     + (f" (fp32 {m['footprint_fp32_mb']:.1f} MiB)" if m.get("footprint_fp32_mb") else "")
                     + ("; zeros kept" if chk.get("zeros_kept") else "")
                     + ("; N:M exact" if chk.get("nm_exact") else "")
                     + ("; every weight on its grid" if chk.get("on_grid") else ""))
    if m.get("zero_shot"):
        lines.append(zero_shot_table(m["zero_shot"]))
    if m.get("speed"):
        sp = m["speed"]
        extra = (f"; 2:4 kernels {sp['sparse24_tokens_per_s']:,.0f} tokens/s ({sp['sparse24_speedup']:.2f}x)"
                 if sp.get("sparse24_tokens_per_s") else "")
        lines.append(f"  prefill speed = {sp['tokens_per_s']:,.0f} tokens/s on {sp['device']} "
                     f"({sp['batch_size']} x {sp['seqlen']}, dense kernels){extra}")
    lines.append(f"  {'stage':<8} {'method':<24} {'status':<7} {'seconds':>9} {'peak MiB':>10}")
    for s in data.get("stages", []):
        lines.append(f"  {s['name']:<8} {str(s.get('method', ''))[:24]:<24} {s.get('status', ''):<7} "
                     f"{s.get('seconds', 0):>9.2f} {s.get('peak_memory_mb', 0):>10.1f}")
    return "\n".join(lines)

"""One experiment: load -> the configured stages (``stages``, default prune, train, quant) -> save -> eval,
with a run record. This module is the only writer of the record.

Each stage is ``run(ctx) -> StageResult`` (:mod:`compress.stages`); its result is written into
``results.json`` (its entry in ``stages``, its report sections, metrics and protocol) and the record is
rewritten after every stage, so a failure in a later stage keeps everything the earlier ones measured.
The model is saved right after the last stage with that stage's saver (before any evaluation, so that an
evaluation that fails loses nothing), and the saved checkpoint is verified by a stock reload in a fresh
process (:mod:`compress.reload`): a checkpoint that does not reload never ends a run ``ok``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf

from compress.calibration.checkpoint import atomic_write_text
from compress.calibration.targets import resolve_targets
from compress.config import Config
from compress.core.config import dataset_key
from compress.core.errors import CompressError, ConfigError, SaveError
from compress.core.modules import weights_fingerprint
from compress.core import distributed as dist
from compress.core.runtime import resolve_device, scoped_torch_flags, seed_everything
from compress.evaluate import flops_metrics, perplexity, size_metrics, size_metrics_from_checkpoint
from compress.lmeval import zero_shot
from compress.calibration.blocks import find_blocks
from compress.calibration.onload import CheckpointReader, DiskBlocks, skeleton
from compress.core.modules import tensors_fingerprint
from compress.plan import estimate as plan_estimate
from compress.plan import refuse_if_it_cannot_fit
from compress.models import (decide_load, load_model, load_tokenizer, local_checkpoint, meta_model, model_identity,
                             resolve_dtype)
from compress.record import RunRecord, code_version
from compress.reload import verify_saved
from compress.registry import NoneConfig
from compress.speed import prefill_throughput, semi_structured_available, serving_speed, to_semi_structured
from compress.stages import STAGES, PretrainedSaver, StageContext, StageResult
from compress.stages.base import DiskSaver
from compress.stages.structured import save_probe_logits

REUSE_KEY = ("output", "reuse_other_code")  # not part of a cell's identity


def _config_dict(cfg: Config, resolved) -> Dict:
    if resolved is not None:
        return OmegaConf.to_container(resolved, resolve=True)
    return dataclasses.asdict(cfg)


def write_result(rec: RunRecord, info: Dict, result: StageResult) -> None:
    """A stage's result into the record: its entry (``info``), its sections, metrics and protocol."""
    info.update(result.summary)
    for k, v in result.sections.items():
        rec.data[k] = v
    rec.data["metrics"].update(result.metrics)
    rec.data["protocol"].update(result.protocol)
    if result.printed:
        print(result.printed)


def evaluate_into(rec: RunRecord, ctx: StageContext, label: str = "ppl") -> Dict[str, float]:
    e = ctx.cfg.eval
    out = {}
    for ds in e.datasets:
        key = dataset_key(ds)
        res = perplexity(ctx.model, ctx.tokenizer, ds, e.seqlen, e.max_windows, e.batch_size, e.add_bos,
                         store=read_store(ctx), device=ctx.device)
        out[key] = res["ppl"]
        rec.data["metrics"].setdefault(label, {})[key] = res["ppl"]
        rec.data["protocol"][key] = dict(res["protocol"], source=ds)
        rec.save()
    return out


def read_store(ctx: StageContext):
    """A model on disk: the block store that reads its current weights (None for a model in memory)."""
    if ctx.weights is None:
        return None
    return DiskBlocks(ctx.model, CheckpointReader(ctx.weights), find_blocks(ctx.model)[0], ctx.dtype())


def zero_shot_into(rec: RunRecord, ctx: StageContext, info: Dict) -> None:
    z = ctx.cfg.eval.zero_shot
    res = zero_shot(ctx.model, ctx.tokenizer, z.tasks, z.num_fewshot, z.limit, z.batch_size, z.include_path,
                    seed=ctx.cfg.seed)
    rec.data["metrics"]["zero_shot"] = res["metrics"]
    rec.data["protocol"]["zero_shot"] = res["protocol"]
    info["tasks"] = {t: {k: v for k, v in m.items() if not k.endswith("_stderr")} for t, m in res["metrics"].items()}
    print(zero_shot_table(res["metrics"]))


def zero_shot_table(metrics: Dict) -> str:
    lines = ["  zero-shot (lm-eval):"]
    for task, m in metrics.items():
        vals = ", ".join(f"{k}={v:.4f}" for k, v in m.items() if not k.endswith("_stderr") and v is not None)
        lines.append(f"    {task}: {vals}")
    return "\n".join(lines)


def speed_into(rec: RunRecord, ctx: StageContext, info: Dict) -> None:
    """Prefill throughput on the run's device; with exact 2:4 weights on a capable GPU, also through the
    2:4 sparse kernels (the model is converted in place: this runs last). Structurally pruned models are
    measured against the dense model, interleaved."""
    e = ctx.cfg.eval
    if ctx.facts.structured:
        return structured_speed_into(rec, ctx, info)
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
    rec.data["metrics"]["speed"] = out
    info.update(out)


def structured_speed_into(rec: RunRecord, ctx: StageContext, info: Dict) -> None:
    """Dense and structurally pruned model measured interleaved in this process: prefill tokens/s at batch 1
    and ``eval.speed_batch_size`` (last-position logits), decode tokens/s (batch 1, KV cache, 128 tokens),
    with the analytic FLOP-ratio ceiling beside the measured prefill ratio."""
    e = ctx.cfg.eval
    dense, _ = load_model(ctx.cfg.model, device=ctx.device)
    res = serving_speed({"dense": dense, "pruned": ctx.model}, batch_sizes=sorted({1, e.speed_batch_size}),
                        seqlen=e.speed_seqlen)
    del dense
    ceiling = ctx.facts.flop_ratio_ceiling  # the stage's, at the same eval.speed_seqlen
    pr = res["models"]["pruned"]
    b = e.speed_batch_size
    out = {"tokens_per_s": pr[f"prefill_b{b}_tokens_per_s"], "batch_size": b, "seqlen": e.speed_seqlen,
           "device": res["device"], "dtype": res["dtype"], "kernels": "dense", "logits": "last position",
           "dense_tokens_per_s": res["models"]["dense"][f"prefill_b{b}_tokens_per_s"],
           "speedup": pr["speedup"], "flop_ratio_ceiling": ceiling,
           "fraction_of_ceiling": {k: v / ceiling for k, v in pr["speedup"].items() if k.startswith("prefill")},
           "detail": res}
    rec.data["metrics"]["speed"] = out
    info.update({k: v for k, v in out.items() if k != "detail"})
    print("  speed (dense -> pruned, interleaved): " + ", ".join(f"{k} {v:.3f}x" for k, v in pr["speedup"].items())
          + f"; FLOP ceiling {ceiling:.3f}x")


def atomic_save(saver, ctx: StageContext, save_to: Path) -> Dict:
    """The saver writes into a temporary directory beside ``save_to``, which then replaces it: a run killed
    while saving leaves no half-written checkpoint under the final name."""
    tmp = save_to.with_name(f".{save_to.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out = saver.save(ctx.model, ctx.tokenizer, tmp)
    if save_to.exists():
        shutil.rmtree(save_to)
    os.replace(tmp, save_to)
    return dict(out, path=str(save_to))


def save_into(rec: RunRecord, ctx: StageContext, saver, save_to: Path, info: Dict) -> None:
    """Save with the last stage's saver, fingerprint the weights, and verify the checkpoint by a stock reload
    in a fresh process. A checkpoint that does not reload is moved aside and, where the stage offers one,
    the working alternative is saved instead (recorded as such); else the run fails, naming the cause."""
    out = atomic_save(saver, ctx, save_to)
    names = resolve_targets(ctx.model).qualified_names()
    if ctx.weights is not None:  # on disk: one weight at a time from the checkpoint
        reader = CheckpointReader(ctx.weights)
        out["fingerprint"] = tensors_fingerprint((n, reader.read([f"{n}.weight"])[f"{n}.weight"]) for n in sorted(names))
    else:
        out["fingerprint"] = weights_fingerprint(ctx.model, names)
    if ctx.facts.structured:  # logits on a fixed probe beside the model, for a logit-by-logit reload check
        out["probe"] = save_probe_logits(ctx.model, Path(save_to).parent / "probe_logits.safetensors")
    info.update(out)
    if not ctx.cfg.output.verify_reload:
        info["reload"] = {"verified": False, "why": "output.verify_reload=false"}
        return
    check = verify_saved(save_to, out["fingerprint"], loader=ctx.facts.loader)
    info["reload"] = check
    if check["ok"]:
        return
    failed = save_to.with_name(save_to.name + ".does-not-reload")
    shutil.rmtree(failed, ignore_errors=True)  # left by an earlier failed run in this directory
    os.replace(save_to, failed)
    fallback = getattr(saver, "fallback", None)
    cause = check.get("error") or "the reloaded weights differ from the saved ones"
    if fallback is None or ctx.cfg.output.save_fallback is False:
        raise SaveError(f"the saved checkpoint ({saver.format}) does not reload with stock from_pretrained: {cause} "
                        f"(moved to {failed})" + (f". The working alternative: output.save_fallback=true saves "
                                                  f"{fallback.format}" if fallback is not None else ""))
    print(f"compress: the {saver.format} checkpoint does not reload ({cause}); saving {fallback.format} instead "
          f"(the failed one is in {failed})")
    alt = atomic_save(fallback, ctx, save_to)
    alt["fingerprint"] = out["fingerprint"]
    check2 = verify_saved(save_to, out["fingerprint"])
    info.clear()
    info.update(alt, reload=check2, fallback_from={"format": saver.format, "error": cause, "moved_to": str(failed)})
    if not check2["ok"]:
        raise SaveError(f"neither {saver.format} nor {fallback.format} reloads: {check2.get('error')}")


def _flat(d, prefix: str = "") -> Dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def resume_guard(root: Path, cfg_dict: Dict, code: str, model: Dict) -> Dict:
    """The run's checkpoint directory: its manifest (config, code version, model identity) is written when
    a run starts; a run that finds one continues from it only when all three are the same, and is refused
    otherwise, naming what changed (each block walk checks its calibration tokens itself)."""
    manifest = root / "manifest.json"
    now = {"config": json.loads(json.dumps(cfg_dict, default=str)), "code_version": code, "model": model}
    if manifest.exists():
        old = json.loads(manifest.read_text())
        a, b = _flat(old.get("config")), _flat(now["config"])
        changed = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
                   if a.get(k, "<absent>") != b.get(k, "<absent>") and k != ".".join(REUSE_KEY)]
        if old.get("code_version") != code:
            changed.append(f"code version: {old.get('code_version')} -> {code}")
        if old.get("model") != model:
            changed.append(f"model: {old.get('model')} -> {model}")
        if changed:
            raise ConfigError(f"{root} holds the checkpoint of a run that differs from this one ("
                              + "; ".join(changed) + "): refusing to resume from it. Use another run directory "
                              "(hydra.run.dir=...), start again with output.checkpoint=false, or delete " + str(root))
        blocks = {d.name: json.loads((d / "state.json").read_text())["done"] + 1
                  for d in sorted(root.iterdir()) if (d / "state.json").exists()}
        print(f"compress: resuming from {root} (finished blocks per stage: {blocks or 'none'})")
        return {"resumed": True, "checkpoint": str(root), "finished_blocks": blocks}
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, json.dumps(now, indent=1, default=str))
    return {"resumed": False, "checkpoint": str(root)}


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


def final_evals(rec: RunRecord, ctx: StageContext) -> None:
    """Perplexity, then zero-shot tasks, then speed (which may convert the model)."""
    cfg = ctx.cfg
    with rec.stage("eval", "perplexity") as info:
        info["ppl"] = evaluate_into(rec, ctx)
    if cfg.eval.zero_shot.tasks:
        with rec.stage("zero_shot", "lm_eval") as info:
            zero_shot_into(rec, ctx, info)
    if cfg.eval.speed:
        with rec.stage("speed", "prefill") as info:
            speed_into(rec, ctx, info)


def _dense_baseline(ctx: StageContext, sweep_dir: Path, recipe: Optional[str]) -> None:
    """In a sweep, evaluate the dense model once per model and eval protocol, into ``sweep_dir/dense-<hash>``."""
    base_cfg = dataclasses.replace(ctx.cfg, prune=NoneConfig(), train=type(ctx.cfg.train)(), quant=NoneConfig(),
                                   transform=NoneConfig(), description="dense baseline of the sweep")
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
        rec.update_metrics(**(size_metrics(ctx.model, *_targets(ctx.cfg)) if ctx.weights is None else
                              size_metrics_from_checkpoint(ctx.model, CheckpointReader(ctx.weights), *_targets(ctx.cfg))),
                           **flops_metrics(ctx.model, ctx.cfg.eval.speed_seqlen))
        sub = dataclasses.replace(ctx, cfg=base_cfg)
        final_evals(rec, sub)
        rec.finish("ok")
    finally:
        os.unlink(d / ".lock")


def _targets(cfg: Config):
    """The linears ``metrics.sparsity`` is measured over: the prune method's selection (all by default)."""
    return getattr(cfg.prune, "targets", (r".*",)), getattr(cfg.prune, "ignore", ())


def prechecks(cfg: Config, load: Optional[Dict] = None) -> None:
    """Before any weight is read: each active stage checks the model built on the meta device from its
    config (group sizes that must divide widths, roles structured pruning must recognise); with the model
    on disk (``load["mode"] == "disk"``), what the stages and evaluations cannot stream is refused."""
    stages = [STAGES[cfg.slot_stage(s)] for s in cfg.stages if getattr(cfg, s).method != "none"]
    if load is not None and load["mode"] == "disk":
        why = f" ({load['reason']})"
        for s in stages:
            if not hasattr(s, "disk_precheck"):
                raise ConfigError(f"the {s.name} stage needs the whole model in memory; the model is streamed from "
                                  f"disk{why}. Set model.load=memory (it must then fit) or drop the stage")
            s.disk_precheck(cfg)
        if cfg.eval.zero_shot.tasks or cfg.eval.speed:
            raise ConfigError(f"eval.zero_shot and eval.speed need the whole model in memory; the model is streamed "
                              f"from disk{why}. Perplexity streams; set eval.zero_shot.tasks=[] and eval.speed=false, "
                              "or model.load=memory")
    stages = [s for s in stages if hasattr(s, "precheck")]
    if stages:
        meta = meta_model(cfg.model)
        for s in stages:
            s.precheck(cfg, meta)


def _state_sha256(model) -> str:
    """sha256 over every tensor of the model's state dict (name, dtype, shape, bytes) in name order: what
    the ranks must agree on beyond the compressed linears."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    ranks = dist.init_from_env(resolve_device(cfg.model.device)) if model is None else None
    out_dir = Path(dist.broadcast_object(str(out_dir)))  # several ranks: rank 0's run directory
    lead = dist.rank() == 0
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = _config_dict(cfg, resolved)
    chash = config_hash(cfg_dict)
    code = code_version()
    if ranks is not None:
        for s in cfg.stages:  # each stage says whether it runs with several ranks
            if getattr(cfg, s).method == "none":
                continue
            stage = STAGES[cfg.slot_stage(s)]
            why = stage.ranks_refusal(cfg) if hasattr(stage, "ranks_refusal") else "it needs one process"
            if why:
                raise ConfigError(f"{ranks['world_size']} ranks: the {s} stage cannot run so: {why} (or launch one "
                                  "process, without torchrun)")
        if cfg.train.method != "none" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
                and not resolve_device(cfg.model.device).startswith("cuda"):
            raise ConfigError("FSDP needs CUDA here: on CPU accelerate runs an FSDP launch config either as plain DDP "
                              "(FSDP2) or not at all (FSDP1: sync_module_states is not supported on cpu). Launch DDP "
                              "instead: accelerate launch --multi_gpu --num_processes N -m compress ...")
        if cfg.train.method != "none" and cfg.train.chunked_loss:
            raise ConfigError("train.chunked_loss calls the decoder directly, outside the DDP wrapper: set "
                              "train.chunked_loss=0 to train with several ranks")
        skip_finished = False
    if skip_finished:
        done = find_finished(out_dir, chash, sweep_dir, code=code, reuse_other_code=cfg.output.reuse_other_code)
        if done is not None:
            print(f"compress: {recipe or 'run'} already finished in {done.parent} (config {chash}, code "
                  f"{json.loads(done.read_text()).get('code_version')}): skipped")
            return json.loads(done.read_text())
    load = decide_load(cfg.model, resolve_device(cfg.model.device)) if model is None else {"mode": "memory",
                                                                                           "reason": "model given"}
    plan = None
    if model is None:
        prechecks(cfg, load)  # before any weight is read
        plan = plan_estimate(cfg, measure=False)  # memory and disk from the config: refused here if it cannot fit
        refuse_if_it_cannot_fit(cfg, plan)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.model.device)
    if lead:
        OmegaConf.save(OmegaConf.create(cfg_dict), out_dir / "config.yaml")
    # per-block checkpoints: one process (several ranks run without them)
    ckpt_root = out_dir / "checkpoint" if cfg.output.checkpoint and model is None and ranks is None else None
    resume = resume_guard(ckpt_root, cfg_dict, code, model_identity(cfg.model)) if ckpt_root is not None else None
    rec = RunRecord(out_dir, cfg_dict, device=device, seed=cfg.seed, recipe=recipe, description=cfg.description,
                    config_hash=chash, code_version=code, write=lead)
    if ranks is not None:
        rec.data["distributed"] = dict(ranks, rank=None, checkpoints="off (one process only)")
    if resume is not None:
        rec.data["resume"] = resume
    if plan is not None:  # what `compress plan` estimated, beside what the stages measure
        rec.data["plan"] = {"peak_host_mb": round(plan["peak_host_bytes"] / 2**20, 1),
                            "disk_mb": round(plan["disk_bytes"] / 2**20, 1), "load": plan["load"]["mode"],
                            "phases": [{"phase": p["phase"], "mode": p["mode"],
                                        "host_mb": None if p["host_bytes"] is None else round(p["host_bytes"] / 2**20, 1)}
                                       for p in plan["phases"]]}
    targets, ignore = _targets(cfg)
    try:
        weights = None
        with rec.stage("load", cfg.model.name) as info:
            info["load"] = load
            if model is None and load["mode"] == "disk":  # weights stay on disk: read block by block
                weights = local_checkpoint(cfg.model)
                model = skeleton(weights, resolve_dtype(cfg.model.dtype, device), cfg.model.trust_remote_code,
                                 cfg.model.revision)
                tokenizer = load_tokenizer(cfg.model)
            elif model is None:
                model, tokenizer = load_model(cfg.model, device=device)
            info["dtype"] = str(next(model.parameters()).dtype)
        ctx = StageContext(cfg, model, tokenizer, device, out_dir, weights=weights)

        def sizes(m):  # the prune stage's selection; FLOPs at the speed measurement's length
            size = size_metrics(m, targets, ignore) if ctx.weights is None else \
                size_metrics_from_checkpoint(m, CheckpointReader(ctx.weights), targets, ignore)
            return {**size, **flops_metrics(m, cfg.eval.speed_seqlen)}

        rec.update_metrics(**sizes(model))
        if sweep_dir is not None and not cfg.is_dense_baseline():
            with scoped_torch_flags():
                _dense_baseline(ctx, Path(sweep_dir), recipe)
        saver = DiskSaver(weights) if weights is not None else PretrainedSaver()
        for slot in cfg.stages:
            method = getattr(cfg, slot).method
            if method == "none":
                continue
            stage = STAGES[cfg.slot_stage(slot)]()
            ctx.checkpoint_dir = ckpt_root / slot if ckpt_root is not None else None
            ctx.work_dir = ckpt_root / slot if ckpt_root is not None else out_dir / "work" / slot
            with rec.stage(slot, method) as info, scoped_torch_flags():
                if stage.name != slot:
                    info["stage"] = stage.name
                try:
                    result = stage.run(ctx)
                except CompressError as e:  # what it did is recorded before the stage fails
                    if isinstance(e.result, StageResult):
                        write_result(rec, info, e.result)
                    raise
                write_result(rec, info, result)
            ctx.model, ctx.facts = result.model, result.apply(ctx.facts)
            ctx.weights = result.weights or ctx.weights
            saver = result.saver or saver
            rec.update_metrics(**sizes(ctx.model))
        if ranks is not None:  # every rank ends the stages with the same model: checked, then rank 0 goes on
            with rec.stage("ranks", "same model on every rank") as info:
                fp = (weights_fingerprint(ctx.model, resolve_targets(ctx.model).qualified_names())["sha256"],
                      _state_sha256(ctx.model)) if ctx.weights is None else (None, None)
                got = dist.gather_objects(fp)
                equal = len(set(got)) == 1
                rec.data["distributed"].update(rank_weights_sha256=[g[0] for g in got],
                                               rank_state_sha256=[g[1] for g in got], ranks_equal=equal)
                info["ranks_equal"] = equal
                dist.barrier()
                dist.destroy()
                if not equal:
                    what = ("the compressed linears" if len({g[0] for g in got}) > 1 else
                            "parameters outside the compressed linears (norms, embeddings, head)")
                    raise CompressError(f"the {len(got)} ranks ended the stages with different models: {what} differ "
                                        "(a statistic computed from one rank's samples only?); nothing is saved. "
                                        "Run in one process, and report it")
            if not lead:
                return rec.data
        save_failed = None
        if cfg.output.save_model:
            try:
                with rec.stage("save", saver.format) as info:
                    save_into(rec, ctx, saver, out_dir / "model", info)
            except CompressError as e:  # recorded as failed; the evaluation still runs, then the run fails
                save_failed = e
        with scoped_torch_flags():
            final_evals(rec, ctx)
        if save_failed is not None:
            rec.finish("failed")
            raise save_failed
        rec.finish("ok")
        if ckpt_root is not None and not cfg.output.keep_checkpoint:
            shutil.rmtree(ckpt_root, ignore_errors=True)
        shutil.rmtree(out_dir / "work", ignore_errors=True)
    finally:
        if print_summary and lead:
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
    save = next((s for s in data.get("stages", []) if s["name"] == "save"), None)
    if save and save.get("reload"):
        r = save["reload"]
        lines.append(f"  saved: {save.get('format')} in {save.get('path')}; stock reload "
                     + ("verified (weights equal)" if r.get("ok") else
                        "not verified" if r.get("verified") is False else f"FAILED: {r.get('error')}"))
    lines.append(f"  {'stage':<8} {'method':<24} {'status':<7} {'seconds':>9} {'peak MiB':>10}")
    for s in data.get("stages", []):
        lines.append(f"  {s['name']:<8} {str(s.get('method', ''))[:24]:<24} {s.get('status', ''):<7} "
                     f"{s.get('seconds', 0):>9.2f} {s.get('peak_memory_mb', 0):>10.1f}")
    return "\n".join(lines)

"""The structured prune stage (``prune.method=structured``): score groups, remove them for real, count.

1. Resolve the roles (:mod:`compress.structured.groups`); an architecture the map does not cover is
   refused here, and before the model loads by :func:`check_structured` (on a meta-device copy).
2. Width (``importance`` other than ``block``): plan how many attention units and MLP channels each block
   loses for ``prune.ratio`` of the block parameters (uniform widths), score the groups, keep the best,
   slice the linears and write the new sizes into the config. ``lora`` trains LoRA adapters in the shared
   trainer meanwhile (masking on a schedule) and merges them before the removal.
3. Depth (``importance=block``): remove the ``round(ratio x blocks)`` blocks whose output differs least
   from their input, outside the protected first/last blocks.
4. The record counts what was removed (exact parameters, analytic FLOPs per token), and the stage fails
   when it removed less than the ratio asked for.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import torch

from compress.errors import ShortfallError, UnsupportedModelError
from compress.structured.groups import block_structure, roles_for
from compress.structured.importance import ESTIMATORS, attn_scores
from compress.structured.surgery import (channel_counts, count_params, flops_per_token, plan_widths, remove_blocks,
                                         remove_width, select)

TOLERANCE = 0.015  # achieved ratio may fall short of the target by rounding to whole heads/channels/blocks only


def check_structured(cfg) -> None:
    """Before the model loads: the architecture is in the role map and its shapes fit (meta-device copy)."""
    p = cfg.prune
    if p.method != "structured":
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.models import model_path

    mc = AutoConfig.from_pretrained(model_path(cfg.model), revision=cfg.model.revision,
                                    trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(mc, trust_remote_code=cfg.model.trust_remote_code)
    if p.importance == "block":
        from compress.calibration.blocks import find_blocks

        find_blocks(meta)
        return
    st = block_structure(meta, roles_for(meta))
    if p.attn_unit != "none" and st.roles.head_dim_key is None:
        raise UnsupportedModelError(
            f"structured pruning: {type(meta).__name__} ({st.roles.name}) has no head_dim config field, so a model "
            "with heads removed would not reload with stock from_pretrained. Use prune.attn_unit=none (MLP channels "
            "only) or prune.importance=block")


def _ctx(ctx, p, calib_ids) -> SimpleNamespace:
    return SimpleNamespace(cfg=p, calib_ids=calib_ids, batch_size=ctx.cfg.calib.batch_size, device=ctx.device,
                           progress=True)


def _lora_importance(ctx, structure, plan, info) -> list:
    """Train LoRA adapters with the LoRA estimator attached; merge them; return the kept groups."""
    from compress.data import packed_sequences
    from compress.structured.lora import LoraPruneCallback
    from compress.training import Trainer

    p = ctx.cfg.prune
    t = ctx.cfg.train
    rank = p.lora_r or t.lora_r
    alpha = t.lora_alpha * rank / t.lora_r  # the same scaling s = alpha / r as the train group's
    tcfg = dataclasses.replace(t, method="lora" if p.lora_base == "fp" else "qlora",
                               qlora_bits=8 if p.lora_base == "8bit" else 4, max_steps=p.lora_steps,
                               eval_every=0, save_every=0, resume=None, distill=False, lora_targets=[r".*"],
                               lora_r=rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha)
    ids, data_info = packed_sequences(ctx.tokenizer, tcfg.source, tcfg.seqlen)
    cb = LoraPruneCallback(structure, plan, p.lora_steps, p.lora_warmup, p.lora_cooldown, p.lora_ema, p.lora_every,
                           p.round_to, score=p.lora_score)
    model = ctx.model
    spill = None
    if tcfg.method == "qlora":  # the full-precision weights wait on disk while the quantized base trains
        import tempfile

        spill = tempfile.TemporaryDirectory(prefix="compress-lora-fp-")
        model.save_pretrained(spill.name, safe_serialization=True)
    trainer = Trainer(model, tcfg, ids, out_dir=ctx.out_dir / "lora_importance", masks={}, device=ctx.device,
                      callbacks=[cb])
    if spill is not None:
        for prm in model.parameters():  # free them (the trainer holds its own quantized copy)
            prm.data = torch.empty(0, dtype=prm.dtype, device=prm.device)
    trained = trainer.fit()
    cb.detach()
    if tcfg.method == "qlora":  # merge s·BA into the full-precision weights of the original model
        from safetensors.torch import load_file

        from compress.structured.lora import _lora_layers

        state = {}
        for f in sorted(Path(spill.name).glob("*.safetensors")):
            state.update(load_file(str(f), device=str(ctx.device)))
        spill.cleanup()
        params = dict(model.named_parameters())  # tied weights are one Parameter: restored once
        missing = [n for n in params if n not in state and params[n].numel() == 0]
        unexpected = [n for n in state if n not in params]
        if missing or unexpected:
            raise RuntimeError(f"reloading the full-precision weights: missing={missing} unexpected={unexpected}")
        for n, t in state.items():
            params[n].data = t
        structure = block_structure(model)  # the modules now hold the reloaded weights
        base = trained.get_base_model() if hasattr(trained, "get_base_model") else trained
        with torch.no_grad():
            for b, lay in zip(structure.blocks, _lora_layers(base, structure)):
                for r, layer in lay.items():
                    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
                    w = b.modules[r].weight
                    w.add_((s * (B.float() @ A.float())).to(w.dtype).to(w.device))
        del trained
    else:
        ctx.model = trained  # merged (peft merge_and_unload keeps the original linears, weights updated)
    info["lora"] = {"steps": trainer.step, "tokens": trainer.step * tcfg.grad_accum * tcfg.micro_batch_size * tcfg.seqlen,
                    "base": p.lora_base, "lora_r": tcfg.lora_r, "lora_alpha": tcfg.lora_alpha, "lr": tcfg.lr,
                    "data": data_info,
                    "schedule": cb.history[-3:], "final_loss": next((h["loss"] for h in reversed(trainer.history)
                                                                     if "loss" in h), None)}
    ctx.record.data["lora_importance_history"] = trainer.history
    return cb.keeps()


def structured_stage(ctx, info: Dict) -> None:
    p = ctx.cfg.prune
    model = ctx.model
    t0 = time.perf_counter()
    est = p.importance
    before = count_params(model)
    seqlen = ctx.cfg.eval.speed_seqlen
    flops_before = flops_per_token(model, seqlen)
    calib_ids = None
    if est in ("activation", "taylor", "block"):
        from compress.data import load_calibration

        c = ctx.cfg.calib
        calib_ids, calib_info = load_calibration(ctx.tokenizer, c.source, c.nsamples, c.seqlen, c.seed, c.text_field)
        ctx.record.data["protocol"]["calibration"] = calib_info
    ectx = _ctx(ctx, p, calib_ids)
    record: Dict = {"importance": est, "target_ratio": float(p.ratio)}
    if est == "block":
        nblocks = before["blocks"]
        scores = ESTIMATORS["block"](model, None, ectx)
        allowed = [i for i in range(nblocks) if p.protect_first <= i < nblocks - p.protect_last]
        n = int(round(p.ratio * nblocks))
        if n > len(allowed) or n >= nblocks:
            raise ShortfallError(f"prune.ratio={p.ratio} asks for {n} of {nblocks} blocks, but only {len(allowed)} are "
                                 f"outside the protected first {p.protect_first} / last {p.protect_last}")
        order = sorted(allowed, key=lambda i: (float(scores[i]), i))
        drop = sorted(order[:n])
        record.update(block_scores=[round(float(s), 6) for s in scores], **remove_blocks(model, drop))
    else:
        structure = block_structure(model)
        if p.attn_unit != "none" and structure.roles.head_dim_key is None:
            raise UnsupportedModelError(f"structured pruning: {structure.model_type} has no head_dim config field; "
                                        "use prune.attn_unit=none or prune.importance=block")
        b0 = structure.blocks[0]
        from compress.structured.surgery import block_params
        from compress.calibration.blocks import find_blocks

        plan = plan_widths(b0, block_params(find_blocks(model)[1][0]), float(p.ratio), p.attn_unit, p.attn_fraction,
                           p.round_to)
        print(f"structured: {est} importance; per block remove {plan.attn_remove} of {plan.attn_units} "
              f"{plan.attn_unit} units and {plan.channel_remove} of {plan.channels} MLP channels "
              f"({plan.ratio:.4f} of the block parameters)")
        record["plan"] = plan.to_dict()
        if est == "lora":
            keeps = _lora_importance(ctx, structure, plan, record)
            model = ctx.model
        else:
            scores = ESTIMATORS[est](model, structure, ectx)
            if p.attn_unit != "none":
                for b, s in zip(structure.blocks, scores):
                    s["attn"] = attn_scores(b, s, p.attn_unit)
            n = len(structure.blocks)
            protect = set(range(p.protect_first)) | set(range(n - p.protect_last, n))
            counts = channel_counts(structure, plan, scores, p.uniform, sorted(protect), p.round_to)
            if not p.uniform:
                record["channels_removed_per_block"] = counts
            keeps = select(structure, plan, scores, counts, sorted(protect) if not p.uniform else ())
        comps = None
        if p.bias_compensation:
            from compress.structured.surgery import bias_compensation

            comps = bias_compensation(structure, keeps, [{r: m.mean for r, m in mom.items() if r in ("o", "down")}
                                                         for mom in ectx.moments])
        record["config_sizes"] = remove_width(model, structure, keeps, uniform=p.uniform)
        if comps is not None:
            from compress.structured.surgery import add_output_bias

            record.update(add_output_bias(model, structure, comps))
        record["kept_heads_block0"] = keeps[0].q_heads
    after = count_params(model)
    flops_after = flops_per_token(model, seqlen)
    removed = before["params_blocks"] - after["params_blocks"]
    achieved = removed / before["params_blocks"]
    record.update(params_before=before, params_after=after, removed_block_params=removed, achieved_ratio=achieved,
                  flops_per_token_before=flops_before, flops_per_token_after=flops_after,
                  flop_ratio_ceiling=flops_before["total"] / flops_after["total"], seconds=time.perf_counter() - t0)
    info.update(record)
    ctx.record.data["structured"] = record
    ctx.artifacts["structured"] = record
    ctx.record.save()
    print(f"structured: removed {removed:,} of {before['params_blocks']:,} decoder-block parameters "
          f"({achieved:.4f}; target {p.ratio}); total {before['params_total']:,} -> {after['params_total']:,}; "
          f"FLOPs/token at seq {seqlen}: {flops_before['total'] / 1e6:.1f}M -> {flops_after['total'] / 1e6:.1f}M "
          f"(ceiling {record['flop_ratio_ceiling']:.3f}x)")
    if removed <= 0 or achieved < float(p.ratio) - TOLERANCE:
        raise ShortfallError(f"structured pruning removed {achieved:.4f} of the decoder-block parameters "
                             f"({removed:,}), less than prune.ratio={p.ratio} (tolerance {TOLERANCE})")

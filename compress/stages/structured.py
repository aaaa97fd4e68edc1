"""The structured stage (``prune=structured``): score groups, remove them for real, count.

1. Resolve the roles (:mod:`compress.calibration.roles`); an architecture no role pattern covers is refused
   here, and before the model loads by :meth:`StructuredStage.precheck` (on a meta-device copy).
2. Width (a ``width`` importance): plan how many attention units and MLP channels each block loses for
   ``prune.ratio`` of the block parameters (uniform widths), score the groups, keep the best, slice the
   linears and write the new sizes into the config. ``lora`` trains LoRA adapters in the shared trainer
   meanwhile (masking on a schedule) and merges them before the removal.
3. Depth (``importance=block``): remove the ``round(ratio x blocks)`` blocks whose output differs least
   from their input, outside the protected first/last blocks.
4. The record counts what was removed (exact parameters, analytic FLOPs per token), and the stage fails
   when it removed less than the ratio asked for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save_file

from compress.calibration.blocks import find_blocks
from compress.calibration.roles import block_structure
from compress.core.errors import ShortfallError, UnsupportedModelError
from compress.core.modules import text_config
from compress.data import load_calibration
from compress.evaluate import flops_per_token
from compress.registry import get
from compress.stages.base import PretrainedSaver, StageContext, StageResult
from compress.structured.scoring import ImportanceContext, attn_scores
from compress.structured.surgery import (WIDTHS_KEY, add_output_bias, bias_compensation, block_params,
                                         channel_counts, count_params, plan_widths, remove_blocks, remove_width,
                                         select)

TOLERANCE = 0.015  # achieved ratio may fall short of the target by rounding to whole heads/channels/blocks only


def save_probe_logits(model, path: Path, batch: int = 2, seqlen: int = 64, keep: int = 8) -> Dict:
    """The model's logits on fixed random token ids (the last ``keep`` positions), saved to ``path``: the save
    step writes them beside a structurally pruned model, so that a reload is compared logit by logit."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=g)
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(dev), use_cache=False).logits[:, -keep:].float().cpu().contiguous()
    save_file({"ids": ids, "logits": logits}, str(path))
    return {"path": str(path), "ids": [batch, seqlen], "positions": keep}


class StructuredStage:
    """``prune=structured``: see the module docstring."""

    name = "structured"

    @staticmethod
    def precheck(cfg, meta) -> None:
        """Before the model loads: the architecture's roles are recognised and its shapes fit (meta copy)."""
        p = cfg.prune
        imp = get("importance", p.importance).impl
        if imp.unit == "depth":
            find_blocks(meta)
            return
        st = block_structure(meta)
        if p.attn_unit != "none" and p.attn_fraction != 0.0 and st.pattern.head_dim_key is None:
            raise UnsupportedModelError(
                f"structured pruning: {type(meta).__name__} ({st.pattern.name}) has no head_dim config field, so a "
                "model with heads removed would not reload with stock from_pretrained. Use prune.attn_unit=none or "
                "prune.attn_fraction=0 (MLP channels only) or prune.importance=block")

    @staticmethod
    def ranks_refusal(cfg) -> str:
        """Several ranks: an importance scored from summed statistics only works; others are refused (why)."""
        if get("importance", cfg.prune.importance).impl.statistics_only:
            return ""
        return (f"prune.importance={cfg.prune.importance} scores from block outputs or training, which the ranks "
                "would compute on different samples; with several ranks use an importance scored from statistics "
                "(activation, magnitude)")

    def run(self, ctx: StageContext) -> StageResult:
        p = ctx.cfg.prune
        model = ctx.model
        t0 = time.perf_counter()
        imp = get("importance", p.importance).impl()
        before = count_params(model)
        seqlen = ctx.cfg.eval.speed_seqlen
        flops_before = flops_per_token(model, seqlen)
        protocol = {}
        ictx = ImportanceContext(model, None, p, batch_size=ctx.cfg.calib.batch_size, device=ctx.device,
                                 tokenizer=ctx.tokenizer, train_cfg=ctx.cfg.train, out_dir=ctx.out_dir)
        if imp.needs_calibration:
            c = ctx.cfg.calib
            ictx.calib_ids, protocol["calibration"] = load_calibration(ctx.tokenizer, c.source, c.nsamples, c.seqlen,
                                                                       c.seed, c.text_field)
        record: Dict = {"importance": p.importance, "target_ratio": float(p.ratio)}
        sections: Dict = {}
        if imp.unit == "depth":
            nblocks = before["blocks"]
            scores = imp(ictx).scores
            allowed = [i for i in range(nblocks) if p.protect_first <= i < nblocks - p.protect_last]
            n = int(round(p.ratio * nblocks))
            if n > len(allowed) or n >= nblocks:
                raise ShortfallError(f"prune.ratio={p.ratio} asks for {n} of {nblocks} blocks, but only {len(allowed)} "
                                     f"are outside the protected first {p.protect_first} / last {p.protect_last}")
            order = sorted(allowed, key=lambda i: (float(scores[i]), i))
            drop = sorted(order[:n])
            record.update(block_scores=[round(float(s), 6) for s in scores], **remove_blocks(model, drop))
        else:
            structure = ictx.structure = block_structure(model)
            if p.attn_unit != "none" and structure.pattern.head_dim_key is None and p.attn_fraction != 0.0:
                raise UnsupportedModelError(f"structured pruning: {structure.model_type} has no head_dim config field; "
                                            "use prune.attn_unit=none or prune.importance=block")
            plan = ictx.plan = plan_widths(structure.blocks[0], block_params(find_blocks(model)[1][0]), float(p.ratio),
                                           p.attn_unit, p.attn_fraction, p.round_to)
            print(f"structured: {p.importance} importance; per block remove {plan.attn_remove} of {plan.attn_units} "
                  f"{plan.attn_unit} units and {plan.channel_remove} of {plan.channels} MLP channels "
                  f"({plan.ratio:.4f} of the block parameters)")
            record["plan"] = plan.to_dict()
            res = imp(ictx)
            record.update(res.info)
            sections.update(res.sections)
            if res.model is not None:
                model = res.model
            if res.keeps is not None:
                keeps = res.keeps
            else:
                scores = res.scores
                if p.attn_unit != "none":
                    for b, s in zip(structure.blocks, scores):
                        s["attn"] = attn_scores(b, s, p.attn_unit)
                n = len(structure.blocks)
                protect = set(range(p.protect_first)) | set(range(n - p.protect_last, n))
                counts = channel_counts(structure, plan, scores, p.uniform, sorted(protect), p.round_to)
                if not p.uniform:
                    record["channels_removed_per_block"] = counts
                keeps = select(structure, plan, scores, counts, sorted(protect) if not p.uniform else ())
            comps = bias_compensation(structure, keeps, res.means) if p.bias_compensation else None
            record["config_sizes"] = remove_width(model, structure, keeps, uniform=p.uniform)
            if comps is not None:
                record.update(add_output_bias(model, structure, comps))
            record["kept_heads_block0"] = keeps[0].q_heads
        after = count_params(model)
        flops_after = flops_per_token(model, seqlen)
        removed = before["params_blocks"] - after["params_blocks"]
        achieved = removed / before["params_blocks"]
        record.update(params_before=before, params_after=after, removed_block_params=removed, achieved_ratio=achieved,
                      flops_per_token_before=flops_before, flops_per_token_after=flops_after,
                      flop_ratio_ceiling=flops_before["total"] / flops_after["total"], seconds=time.perf_counter() - t0)
        sections["structured"] = record
        printed = (f"structured: removed {removed:,} of {before['params_blocks']:,} decoder-block parameters "
                   f"({achieved:.4f}; target {p.ratio}); total {before['params_total']:,} -> {after['params_total']:,}; "
                   f"FLOPs/token at seq {seqlen}: {flops_before['total'] / 1e6:.1f}M -> {flops_after['total'] / 1e6:.1f}M "
                   f"(ceiling {record['flop_ratio_ceiling']:.3f}x)")
        # non-uniform widths reload with load_pruned only: stock from_pretrained builds every layer from one
        # config and refuses them, by design (the save step's reload check uses that loader and says so)
        loader = "compress.structured.surgery:load_pruned" if getattr(text_config(model), WIDTHS_KEY, None) else None
        result = StageResult(model, summary=dict(record), sections=sections, protocol=protocol,
                             facts={"structured": True, "flop_ratio_ceiling": record["flop_ratio_ceiling"],
                                    "loader": loader},
                             saver=PretrainedSaver(), printed=printed)
        if removed <= 0 or achieved < float(p.ratio) - TOLERANCE:
            raise ShortfallError(f"structured pruning removed {achieved:.4f} of the decoder-block parameters "
                                 f"({removed:,}), less than prune.ratio={p.ratio} (tolerance {TOLERANCE})", result=result)
        return result

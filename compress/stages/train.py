"""The train stage: recovery fine-tuning (full, LoRA, QLoRA, distillation) in the shared trainer, with the
zero pattern of every pruned linear (and any N:M pattern) checked after it."""

from __future__ import annotations

from typing import Dict

from compress.core.config import dataset_key
from compress.core.errors import CompressError
from compress.data import packed_sequences
from compress.evaluate import perplexity
from compress.models import load_model
from compress.stages.base import PretrainedSaver, StageContext, StageResult
from compress.training import Trainer, check_masks, record_masks


class TrainStage:
    """``train=full|lora|qlora``."""

    name = "train"

    @staticmethod
    def ranks_refusal(cfg) -> str:
        """Several ranks (torch.distributed): supported."""
        return ""

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg.train
        model = ctx.model
        masks = record_masks(model)
        ids, data_info = packed_sequences(ctx.tokenizer, cfg.source, cfg.seqlen)
        teacher = load_model(ctx.cfg.model, device=ctx.device)[0] if cfg.distill else None
        e = ctx.cfg.eval

        def eval_fn(m):
            return perplexity(m, ctx.tokenizer, e.datasets[0], e.seqlen, e.max_windows, e.batch_size, e.add_bos,
                              progress=False)["ppl"]

        summary: Dict = {}
        metrics: Dict = {}
        if cfg.eval_before:
            summary["ppl_before_train"] = eval_fn(model)
            metrics["ppl_before_train"] = {dataset_key(e.datasets[0]): summary["ppl_before_train"]}
        trainer = Trainer(model, cfg, ids, out_dir=ctx.out_dir, teacher=teacher, eval_fn=eval_fn, masks=masks,
                          device=ctx.device)
        model = trainer.fit(resume=cfg.resume)
        check = check_masks(model, masks, ctx.facts.nm) if cfg.method != "qlora" else {
            "masked_modules": len(masks), "note": "qlora adapters not merged"}
        summary.update({"steps": trainer.step, "tokens": trainer.step * cfg.grad_accum * cfg.micro_batch_size * cfg.seqlen,
                        "final_loss": next((h["loss"] for h in reversed(trainer.history) if "loss" in h), None),
                        "data": data_info, "sparsity_check": check,
                        "distributed_type": str(trainer.acc.distributed_type).split(".")[-1],
                        "processes": trainer.acc.num_processes})
        result = StageResult(model, summary=summary, metrics=metrics,
                             sections={"train_history": trainer.history, "sparsity_check": check},
                             saver=PretrainedSaver())
        if check.get("pruned_weights_still_zero") is False or check.get("nm_exact") is False:
            raise CompressError(f"sparsity broken by training: {check}", result=result)
        return result

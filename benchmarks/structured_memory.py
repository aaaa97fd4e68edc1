"""Peak memory of the importance pass of structured pruning: ``taylor`` (full gradients over the P1
calibration batches) against ``lora`` (LoRAPrune's LoRA fine-tuning with the estimator attached), each in
a fresh process on the default model, under MALLOC_ARENA_MAX=1.

Two figures per row: the heap peak (bytes in use by malloc, sampled every 2 ms: the CPU analogue of
``torch.cuda.max_memory_allocated``, ``compress.core.memory.HeapPeak``) and the process peak RSS, both over
the importance pass alone, with the heap in use after loading the model as the baseline.

    python benchmarks/structured_memory.py --json benchmarks/results/structured_memory.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import child as run_child
from common import write

from compress.calibration.blocks import find_blocks
from compress.calibration.roles import block_structure
from compress.config import prune_config
from compress.core.memory import HeapPeak, reset_rss_peak, rss_peak_mb
from compress.data import load_calibration
from compress.models import load_model
from compress.registry import get
from compress.schema import ModelConfig, TrainConfig
from compress.structured.scoring import ImportanceContext
from compress.structured.surgery import block_params, plan_widths

ROWS = {
    "taylor": {},
    "lora": {"train": {}},
    "lora_ckpt_8bit_chunked": {"train": {"activation_checkpointing": True, "optimizer": "adamw_8bit",
                                         "chunked_loss": 512, "micro_batch_size": 1, "grad_accum": 2}},
    "lora_4bit_ckpt_8bit_chunked": {"train": {"activation_checkpointing": True, "optimizer": "adamw_8bit",
                                              "chunked_loss": 512, "micro_batch_size": 1, "grad_accum": 2},
                                    "lora_base": "4bit"},
    # rank 64, as the loraprune recipes (and prune.lora_r=64 in BENCHMARKS.md's table)
    "lora_r64": {"train": {"lora_r": 64, "lora_alpha": 128}},
    "lora_r64_ckpt_8bit_chunked": {"train": {"lora_r": 64, "lora_alpha": 128, "activation_checkpointing": True,
                                             "optimizer": "adamw_8bit", "chunked_loss": 512, "micro_batch_size": 1,
                                             "grad_accum": 2}},
}

def child(name: str, spec: dict, steps: int) -> dict:
    """One importance pass on the default model, heap and RSS peaks above the level after loading."""
    model, tok = load_model(ModelConfig(device="cpu"))
    base = HeapPeak()
    with base:
        pass
    reset_rss_peak()
    t0 = time.time()
    st = block_structure(model)
    with HeapPeak() as hp:
        if name == "taylor":
            ids, _ = load_calibration(tok, "wikitext2", 32, 512, 0)
            ictx = ImportanceContext(model, st, prune_config("structured", importance="taylor"), calib_ids=ids,
                                     progress=False)
            get("importance", "taylor").impl()(ictx)
            tokens = int(ids.numel())
        else:
            train = dict(dict(micro_batch_size=2, seqlen=512, lr=2e-4, warmup_steps=0, lora_r=16, lora_alpha=32),
                         **spec.get("train", {}))
            cfg = prune_config("structured", importance="lora", ratio=0.2, lora_steps=steps,
                               lora_base=spec.get("lora_base", "fp"))
            plan = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), 0.2, "kv_group", 0.0, 8)
            res = get("importance", "lora").impl()(ImportanceContext(
                model, st, cfg, plan=plan, tokenizer=tok, train_cfg=TrainConfig(**train),
                out_dir=Path(tempfile.mkdtemp()), progress=False))
            tokens = res.info["lora"]["tokens"]
    return {"row": name, "heap_peak_mb": hp.peak_mb, "heap_after_load_mb": base.peak_mb,
            "heap_peak_above_model_mb": hp.peak_mb - base.peak_mb, "rss_peak_mb": rss_peak_mb(),
            "seconds": time.time() - t0, "tokens": tokens}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", default="")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], json.loads(a.child[1]), int(a.child[2]))))
        return
    out = json.loads(Path(a.json).read_text()).get("rows", {}) if a.json and Path(a.json).exists() else {}
    for name, spec in ROWS.items():
        if a.only and name not in a.only.split(","):
            continue
        res = run_child(__file__, ["taylor" if name == "taylor" else "lora", json.dumps(spec), a.steps],
                        env={"MALLOC_ARENA_MAX": "1"})
        res["row"], res["spec"] = name, spec
        out[name] = res
        print(json.dumps(res), flush=True)
    if "taylor" in out:
        for name, r in out.items():
            r["heap_peak_x_taylor"] = r["heap_peak_mb"] / out["taylor"]["heap_peak_mb"]
            r["above_model_x_taylor"] = r["heap_peak_above_model_mb"] / out["taylor"]["heap_peak_above_model_mb"]
    if a.json:
        write(a.json, {"rows": out})


if __name__ == "__main__":
    main()

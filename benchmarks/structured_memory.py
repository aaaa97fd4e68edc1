"""Peak memory of the importance pass of structured pruning: ``taylor`` (full gradients over the P1
calibration batches) against ``lora`` (LoRAPrune's LoRA fine-tuning with the estimator attached), each in
a fresh process on the default model, under MALLOC_ARENA_MAX=1.

Two figures per row: the heap peak (bytes in use by malloc, sampled every 2 ms: the CPU analogue of
``torch.cuda.max_memory_allocated``, ``compress.record.HeapPeak``) and the process peak RSS, both over
the importance pass alone, with the heap in use after loading the model as the baseline.

    python benchmarks/structured_memory.py --json benchmarks/results/structured_memory.json
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

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

CHILD = r"""
import json, sys, time, types, dataclasses
import torch
from compress.config import ModelConfig, PruneConfig, TrainConfig, Config
from compress.models import load_model
from compress.record import HeapPeak, _reset_rss_peak, _rss_peak_mb
from compress.data import load_calibration
name, spec, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model, tok = load_model(ModelConfig(device="cpu"))
from compress.record import HeapPeak as HP
base = HP(); base.__enter__(); base.__exit__(); base_mb = base.peak_mb
_reset_rss_peak()
t0 = time.time()
with HeapPeak() as hp:
    if name == "taylor":
        from compress.structured.groups import block_structure
        from compress.structured.importance import ESTIMATORS
        ids, _ = load_calibration(tok, "wikitext2", 32, 512, 0)
        ctx = types.SimpleNamespace(cfg=PruneConfig(method="structured", importance="taylor"), calib_ids=ids,
                                    batch_size=1, device="cpu", progress=False)
        ESTIMATORS["taylor"](model, block_structure(model), ctx)
        tokens = int(ids.numel())
    else:
        from compress.structured.stage import _lora_importance
        from compress.structured.groups import block_structure
        from compress.structured.surgery import plan_widths, block_params
        from compress.calibration.blocks import find_blocks
        from compress.record import RunRecord
        train = dict(dict(micro_batch_size=2, seqlen=512, lr=2e-4, warmup_steps=0, lora_r=16, lora_alpha=32), **spec.get("train", {}))
        cfg = Config(prune=PruneConfig(method="structured", importance="lora", ratio=0.2, lora_steps=steps,
                                       lora_base=spec.get("lora_base", "fp")), train=TrainConfig(**train))
        st = block_structure(model)
        plan = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), 0.2, "kv_group", 0.0, 8)
        import tempfile, pathlib
        out = pathlib.Path(tempfile.mkdtemp())
        rec = types.SimpleNamespace(data={}, save=lambda: None)
        ctx = types.SimpleNamespace(cfg=cfg, model=model, tokenizer=tok, device="cpu", out_dir=out, record=rec)
        info = {}
        _lora_importance(ctx, st, plan, info)
        tokens = info["lora"]["tokens"]
print(json.dumps({"row": name, "heap_peak_mb": hp.peak_mb, "heap_after_load_mb": base_mb,
                  "heap_peak_above_model_mb": hp.peak_mb - base_mb, "rss_peak_mb": _rss_peak_mb(),
                  "seconds": time.time() - t0, "tokens": tokens}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    env = dict(os.environ, MALLOC_ARENA_MAX="1")
    out = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).exists() else {}
    for name, spec in ROWS.items():
        if a.only and name not in a.only.split(","):
            continue
        p = subprocess.run([sys.executable, "-c", CHILD, name.split("_")[0] if name == "taylor" else "lora",
                            json.dumps(spec), str(a.steps)], capture_output=True, text=True, env=env)
        if p.returncode:
            print(name, p.stderr[-2000:])
            continue
        res = json.loads(p.stdout.strip().splitlines()[-1])
        res["row"], res["spec"] = name, spec
        out[name] = res
        print(json.dumps(res), flush=True)
    if "taylor" in out:
        for name, r in out.items():
            r["heap_peak_x_taylor"] = r["heap_peak_mb"] / out["taylor"]["heap_peak_mb"]
            r["above_model_x_taylor"] = r["heap_peak_above_model_mb"] / out["taylor"]["heap_peak_above_model_mb"]
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Memory and throughput of the trainer's memory tricks, one configuration per fresh process.

Setup: the embedded SmolLM2-135M, seq 512, micro-batch 4 (accumulation: micro-batch 1 x 4), a fixed
number of optimizer steps on the WikiText-2 validation text. Peak memory on GPU is
``torch.cuda.max_memory_allocated``. On CPU two figures: the process's peak RSS (VmHWM: the whole
process, Python and libraries included, and memory the C allocator freed but kept), and the heap peak
(bytes in use by glibc malloc, sampled every 2 ms with ``MALLOC_ARENA_MAX=1``: the CPU analogue of the
CUDA allocator peak). Tokens/s excludes the first (warm-up) step.

    python benchmarks/train_memory.py                 # all configurations (about 10 min on 2 CPU cores)
    python benchmarks/train_memory.py --only plain,lora_ckpt_8bit
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import child, write

from compress.core.memory import HeapPeak, PeakMemory
from compress.data import packed_sequences
from compress.models import load_model
from compress.schema import ModelConfig, TrainConfig
from compress.training import Trainer

CONFIGS = {
    "plain": dict(method="full", optimizer="adamw"),
    "ckpt": dict(method="full", optimizer="adamw", activation_checkpointing=True),
    "adamw_8bit": dict(method="full", optimizer="adamw_8bit"),
    "bf16": dict(method="full", optimizer="adamw", precision="bf16"),
    "accum_1x4": dict(method="full", optimizer="adamw", micro_batch_size=1, grad_accum=4),
    "lora": dict(method="lora", optimizer="adamw"),
    "qlora_nf4": dict(method="qlora", qlora_bits=4, optimizer="adamw"),
    "lora_ckpt_8bit": dict(method="lora", optimizer="adamw_8bit", activation_checkpointing=True),
    "lora_ckpt_8bit_chunked": dict(method="lora", optimizer="adamw_8bit", activation_checkpointing=True, chunked_loss=512),
    "qlora_ckpt_8bit": dict(method="qlora", qlora_bits=4, optimizer="adamw_8bit", activation_checkpointing=True),
    "lora_ckpt_8bit_bf16": dict(method="lora", optimizer="adamw_8bit", activation_checkpointing=True, precision="bf16"),
}


def one(name: str, steps: int, device: str) -> dict:
    kw = dict(max_steps=steps, micro_batch_size=4, seqlen=512, lr=1e-5, log_every=1, seed=0)
    kw.update(CONFIGS[name])
    cfg = TrainConfig(**kw)
    with PeakMemory(device) as mem, HeapPeak() as heap:
        model, tok = load_model(ModelConfig(device=device))
        ids, _ = packed_sequences(tok, "wikitext2", 512)
        t = Trainer(model, cfg, ids, device=device)
        t.fit()
    hist = t.history
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.seqlen
    dt = hist[-1]["seconds"] - hist[0]["seconds"]
    return {"name": name, "config": CONFIGS[name], "steps": steps, "peak_memory_mb": mem.peak_mb,
            "heap_peak_mb": heap.peak_mb if device == "cpu" else None,
            "peak_kind": mem.kind, "tokens_per_s": tokens_per_step * (len(hist) - 1) / dt if dt > 0 else None,
            "final_loss": hist[-1]["loss"], "device": device, "torch_threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/train_memory.json")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(one(args.child, args.steps, args.device)), flush=True)
        return 0
    rows = []
    for name in (args.only.split(",") if args.only else CONFIGS):
        t0 = time.time()
        try:  # every thread in glibc's main arena, which HeapPeak reads
            row = child(__file__, [name, "--steps", args.steps, "--device", args.device], env={"MALLOC_ARENA_MAX": "1"})
        except RuntimeError as e:
            rows.append({"name": name, "error": str(e)[-2000:]})
            print(f"{name}: FAILED\n{e}", flush=True)
            continue
        row["wall_s"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args.out, {"rows": rows})
    base = next((r for r in rows if r["name"] == "plain" and "peak_memory_mb" in r), None)
    heap = base is not None and base.get("heap_peak_mb") is not None
    print("| config | peak MiB | × plain |" + (" heap peak MiB | × plain |" if heap else "") + " tokens/s | × plain |\n"
          "| --- | --- | --- |" + (" --- | --- |" if heap else "") + " --- | --- |")
    for r in rows:
        if "peak_memory_mb" not in r:
            print(f"| {r['name']} | failed | | | |")
            continue
        rm = r["peak_memory_mb"] / base["peak_memory_mb"] if base else float("nan")
        rt = r["tokens_per_s"] / base["tokens_per_s"] if base and r["tokens_per_s"] else float("nan")
        hp = (f" {r['heap_peak_mb']:.0f} | {r['heap_peak_mb'] / base['heap_peak_mb']:.2f} |" if heap else "")
        print(f"| {r['name']} | {r['peak_memory_mb']:.0f} | {rm:.2f} |{hp} {r['tokens_per_s']:.0f} | {rt:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

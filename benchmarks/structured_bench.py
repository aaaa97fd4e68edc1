"""Structured pruning under protocol P1: each importance at about 20% and 50% of the decoder-block
parameters, ppl right after pruning and after the same LoRA recovery budget, prune seconds, peak memory.

Every row is one CLI run in a fresh process (`python -m compress ...`), so each row's memory is its own:

    python benchmarks/structured_bench.py --recover-steps 50 --lora-steps 50 --recover-lr 1e-3 --jobs 2 \
        --out /tmp/sb2 --json benchmarks/results/structured_p1_lr1e3.json     # BENCHMARKS.md's table
    python benchmarks/structured_bench.py --markdown --json benchmarks/results/structured_p1_lr1e3.json

Recovery for every row: `train=lora`, r 16, lr ``--recover-lr`` (default 2e-4, the first protocol's; the
table uses 1e-3), 2 warm-up steps, ``--recover-steps`` x 2 x 512 tokens of
the WikiText-2 validation text. The ``lora`` rows also train during pruning (``--lora-steps`` x 2 x 512
tokens); ``lora_eq`` splits the same total budget as the others' recovery alone (half during pruning,
half in recovery), for a fair comparison; ``--lora-args`` adds overrides to the lora rows (e.g.
``prune.lora_r=64``), whose LoRAPrune training uses the same train settings as the recovery.
``activation_bc`` adds FLAP's bias compensation.
``--jobs 2`` runs two rows at once with one thread each (quality figures only: their seconds are then
not comparable with a row run alone).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

P1 = ["calib.nsamples=32", "calib.seqlen=512", "calib.seed=0", "eval.seqlen=512", "eval.max_windows=40", "seed=0"]


def rows(recover: int, lora_steps: int, lora_args=()):
    half = max(1, recover // 2)
    out = []
    for ratio in (0.2, 0.5):
        tag = int(ratio * 100)
        for imp in ("activation", "lora", "taylor", "magnitude"):
            extra = [f"prune.lora_steps={lora_steps}", *lora_args] if imp == "lora" else []
            out.append((f"{imp}_{tag}", [f"prune.importance={imp}", f"prune.ratio={ratio}", *extra], recover))
        out.append((f"activation_bc_{tag}", ["prune.importance=activation", f"prune.ratio={ratio}",
                                              "prune.bias_compensation=true"], recover))
        if ratio == 0.2:
            out.append(("block_20", ["prune.importance=block", "prune.ratio=0.2"], recover))
            out.append(("lora_eq_20", ["prune.importance=lora", "prune.ratio=0.2", f"prune.lora_steps={half}",
                                       *lora_args], recover - half))
    return out


DENSE_PPL = 28.74  # P1, the embedded model
ORDER = ["activation_20", "activation_bc_20", "lora_20", "lora_eq_20", "taylor_20", "magnitude_20", "block_20",
         "activation_50", "activation_bc_50", "lora_50", "taylor_50", "magnitude_50"]


def markdown(results: dict) -> str:
    head = ("| row | removed (of 106,202,880 block params) | params total | footprint MiB | ppl after pruning | "
            "ppl after recovery | × dense | LoRA tokens in pruning | recovery tokens | prune s | prune peak RSS MiB |")
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for name in sorted(results, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-200:]!r} |")
            continue
        lines.append(
            f"| {name} | {r['removed_block_params']:,} ({r['achieved_ratio']:.4f}) | {r['params_total_after']:,} | "
            f"{r['footprint_mb']:.1f} | {r['ppl_pruned']:.2f} | {r['ppl_recovered']:.2f} | "
            f"{r['ppl_recovered'] / DENSE_PPL:.2f} | {r['lora_importance_tokens']:,} | {r['recovery_tokens']:,} | "
            f"{r['prune_seconds']:.1f} | {r['prune_peak_mb']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/structured_bench")
    ap.add_argument("--json", default="benchmarks/results/structured_p1.json")
    ap.add_argument("--recover-steps", type=int, default=20)
    ap.add_argument("--lora-steps", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated row names")
    ap.add_argument("--lora-args", default="", help="extra overrides for the lora rows, space-separated")
    ap.add_argument("--recover-lr", default="2e-4")
    ap.add_argument("--jobs", type=int, default=1,
                    help="rows at once, one thread each (for quality only: their seconds are not comparable)")
    ap.add_argument("--markdown", action="store_true", help="print the table of --json and exit")
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    results = json.loads(Path(a.json).read_text()) if Path(a.json).exists() else {}
    if a.markdown:
        print(markdown(results))
        return
    lock = threading.Lock()
    todo = [r for r in rows(a.recover_steps, a.lora_steps, a.lora_args.split()) if not only or r[0] in only]
    todo.sort(key=lambda r: not r[0].startswith("lora"))  # the longest rows first

    def run(row):
        name, args, rec = row
        d = Path(a.out) / name
        train = ["train=lora", f"train.max_steps={rec}", "train.micro_batch_size=2", "train.seqlen=512",
                 f"train.lr={a.recover_lr}", "train.warmup_steps=2", "train.lora_r=16", "train.lora_alpha=32"]
        cmd = [sys.executable, "-m", "compress", "prune=structured", *args, *train, *P1, f"hydra.run.dir={d}"]
        print("$", " ".join(cmd[1:]), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1") if a.jobs > 1 else None
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            print(r.stderr[-3000:])
            row_out = {"error": r.stderr[-1500:], "command": " ".join(cmd[1:])}
        else:
            data = json.loads((d / "results.json").read_text())
            st = data["structured"]
            stages = {s["name"]: s for s in data["stages"]}
            lora = st.get("lora") or {}
            row_out = {
                "command": "compress " + " ".join(cmd[3:]),
                "importance": st["importance"], "target_ratio": st["target_ratio"],
                "achieved_ratio": st["achieved_ratio"],
                "params_blocks_after": st["params_after"]["params_blocks"],
                "params_total_after": st["params_after"]["params_total"],
                "removed_block_params": st["removed_block_params"], "plan": st.get("plan"),
                "footprint_mb": data["metrics"]["footprint_mb"],
                "ppl_pruned": data["metrics"]["ppl_before_train"]["wikitext2"],
                "ppl_recovered": data["metrics"]["ppl"]["wikitext2"],
                "prune_seconds": stages["prune"]["seconds"], "prune_peak_mb": stages["prune"].get("peak_memory_mb"),
                "train_seconds": stages["train"]["seconds"], "recovery_tokens": stages["train"].get("tokens"),
                "lora_importance_tokens": lora.get("tokens", 0), "flop_ratio_ceiling": st["flop_ratio_ceiling"],
                "wall_s": time.time() - t0, "jobs": a.jobs,
                "device": data.get("environment", {}).get("cpu") or data.get("device"),
            }
        with lock:
            results[name] = row_out
            print(json.dumps({name: row_out}), flush=True)
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(results, indent=1))

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        list(pool.map(run, todo))

if __name__ == "__main__":
    main()

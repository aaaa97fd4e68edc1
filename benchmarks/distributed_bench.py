"""Calibration across processes on the default model: 2 ranks (torchrun, gloo, one thread each) against 1 rank
(one thread), one run after the other in this session, for SparseGPT 50%, Wanda 50% and GPTQ w4 g64 under
protocol P1 (32 x 512 calibration tokens, 40 x 512 WikiText-2 test tokens).

Per case: ppl of both and their relative difference; the share of identical mask entries (pruning) or of
identical packed code words (GPTQ: 8 four-bit codes per int32 word, so one differing code makes its word differ); the calibration
stage's wall time (the stage entry's seconds in rank 0's record) and the 2-rank / 1-rank ratio; whether the
ranks' weights were bitwise equal (checked by the run). Nothing else may run on the machine meanwhile.

    python benchmarks/distributed_bench.py --out benchmarks/results/distributed_p1.json [--only sparsegpt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from common import ROOT, write

CASES = {"sparsegpt_50": (["prune=sparsegpt", "prune.sparsity=0.5"], "prune"),
         "wanda_50": (["prune=wanda", "prune.sparsity=0.5"], "prune"),
         "gptq_w4g64": (["quant=gptq", "quant.bits=4", "quant.group_size=64"], "quant")}


def run(args, run_dir: Path, ranks: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "-m", "compress"] \
        if ranks > 1 else [sys.executable, "-m", "compress"]
    t0 = time.perf_counter()
    cp = subprocess.run([*base, *args, "output.save_model=true", "output.verify_reload=false",
                         f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if cp.returncode != 0:
        raise RuntimeError(cp.stderr[-3000:])
    data = json.loads((run_dir / "results.json").read_text())
    data["_wall"] = wall
    return data


def weights(run_dir: Path) -> dict:
    out = {}
    for f in sorted((run_dir / "model").glob("*.safetensors")):
        out.update({k: v for k, v in load_file(str(f)).items() if k.endswith(("proj.weight", "weight_packed"))})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/distributed_p1.json")
    ap.add_argument("--runs", default="/tmp/distributed_bench")
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    rows = []
    for name, (args, stage) in CASES.items():
        if a.only and name not in a.only.split(","):
            continue
        res = {}
        for ranks in (1, 2):
            d = Path(a.runs) / f"{name}-{ranks}"
            res[ranks] = run(args, d, ranks)
        w1, w2 = weights(Path(a.runs) / f"{name}-1"), weights(Path(a.runs) / f"{name}-2")
        if stage == "prune":
            same = sum(int(((w1[k] == 0) == (w2[k] == 0)).sum()) for k in w1)
        else:
            same = sum(int((w1[k] == w2[k]).sum()) for k in w1)
        total = sum(v.numel() for v in w1.values())
        (ds, p1), = res[1]["metrics"]["ppl"].items()
        p2 = res[2]["metrics"]["ppl"][ds]
        s1 = next(s for s in res[1]["stages"] if s["name"] == stage)["seconds"]
        s2 = next(s for s in res[2]["stages"] if s["name"] == stage)["seconds"]
        row = {"case": name, "ppl_1": p1, "ppl_2": p2, "ppl_rel_diff": p2 / p1 - 1,
               "identical": same / total, "compared": "masks" if stage == "prune" else "packed code words",
               "stage_seconds_1": s1, "stage_seconds_2": s2, "ratio": s2 / s1, "wall_1": res[1]["_wall"],
               "wall_2": res[2]["_wall"], "ranks_equal": res[2]["distributed"]["ranks_equal"],
               "distributed": res[2]["distributed"]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "distributed"}), flush=True)
    write(a.out, {"rows": rows, "threads": "OMP_NUM_THREADS=1 per process", "torch": torch.__version__})
    print("| case | ppl 1 rank | ppl 2 ranks | rel. diff | identical | stage s 1 rank | stage s 2 ranks | ratio | ranks equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['ppl_1']:.4f} | {r['ppl_2']:.4f} | {r['ppl_rel_diff']:+.2e} | "
              f"{r['identical'] * 100:.3f}% ({r['compared']}) | {r['stage_seconds_1']:.1f} | {r['stage_seconds_2']:.1f} | "
              f"{r['ratio']:.3f} | {r['ranks_equal']} |")


if __name__ == "__main__":
    main()

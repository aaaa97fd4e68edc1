"""Prune-stage seconds of two code versions, interleaved in fresh processes under P1 calibration
(32 x 512 tokens), each as a ratio to a dense forward over the same tokens measured in the same process.

    git worktree add /tmp/old <commit>
    python benchmarks/prune_time_old_vs_new.py --old /tmp/old --new . --rounds 3 --out results/x.json

Used to check that a refactoring of the calibration pipeline kept Wanda 50% and SparseGPT 50%
(single pass) within noise of the earlier code.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import sys, time, torch, json
sys.path.insert(0, sys.argv[1])
from compress.config import ModelConfig, PruneConfig
from compress.models import load_model
from compress.pruning import prune_model
from compress.data import load_calibration
model, tok = load_model(ModelConfig(device="cpu"))
ids, _ = load_calibration(tok, "wikitext2", 32, 512, 0)
t = time.perf_counter()
with torch.no_grad():
    for i in range(32): model(input_ids=ids[i:i+1], use_cache=False)
fwd = time.perf_counter() - t
t = time.perf_counter()
prune_model(model, tok, PruneConfig(method=sys.argv[2], sparsity=0.5, sequential=True), calib_ids=ids, progress=False)
print(json.dumps({"fwd": fwd, "prune": time.perf_counter() - t}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = []
    for r in range(args.rounds):
        for method in args.methods.split(","):
            for name, root in (("old", args.old), ("new", args.new)):
                out = subprocess.run([sys.executable, "-c", CHILD, str(Path(root).resolve()), method],
                                     capture_output=True, text=True, cwd="/tmp")
                d = json.loads(out.stdout.strip().splitlines()[-1])
                d.update(round=r, method=method, code=name, ratio=d["prune"] / d["fwd"])
                res.append(d)
                print(json.dumps(d), flush=True)
    summary = {f"{m}/{c}": statistics.median(d["ratio"] for d in res if d["method"] == m and d["code"] == c)
               for m in args.methods.split(",") for c in ("old", "new")}
    print(json.dumps({"median_ratio": summary}))
    Path(args.out).write_text(json.dumps({"rows": res, "median_ratio": summary}, indent=1))


if __name__ == "__main__":
    main()

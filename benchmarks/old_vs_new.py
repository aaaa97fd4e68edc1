"""The same experiments by two code versions, one process at a time on one machine: are the results
identical? For each case both checkouts run the CLI (``python -m compress`` with the checkout as working
directory, so each runs its own source tree) with ``output.save_model=true``; compared are the weights'
fingerprint recorded by the save step (sha256 over the float32 weights of every decoder linear: masks and
weights), the zero count, and the perplexity to the printed digits. Stage seconds are reported beside,
as a ratio to the quant stage's own dense-forward yardstick where there is one.

    git worktree add /tmp/old <commit>
    python benchmarks/old_vs_new.py --old /tmp/old --out benchmarks/results/old_vs_new.json
    python benchmarks/old_vs_new.py --old /tmp/old --only wanda_50,gptq_w4_g64

A case whose keys were renamed gives both spellings (old, new).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import ROOT, cli, write

SAME = object()
# name -> (old overrides, new overrides or SAME)
CASES = {
    "wanda_50": (["prune=wanda", "prune.sparsity=0.5"], SAME),
    "sparsegpt_50": (["prune=sparsegpt", "prune.sparsity=0.5"], SAME),
    "sparsegpt_2of4": (["prune=sparsegpt", "prune.pattern=2:4"], SAME),
    "gptq_w4_g64": (["quant=gptq", "quant.bits=4", "quant.group_size=64"], SAME),
    "sparsegpt_50_gptq_w4_g64_joint": (
        ["prune=sparsegpt", "prune.sparsity=0.5", "quant=gptq", "quant.bits=4", "quant.group_size=64", "quant.joint=true"],
        ["quant=sparsegpt_gptq", "quant.sparsity=0.5", "quant.bits=4", "quant.group_size=64"]),
    "structured_activation_20": (["prune=structured", "prune.importance=activation", "prune.ratio=0.2"], SAME),
    "best_unstructured_50": (["recipe=best_unstructured_50"], SAME),
}


def summary(data) -> dict:
    save = next((s for s in data.get("stages", []) if s["name"] == "save"), {})
    fp = save.get("fingerprint") or {}
    stages = {s["name"]: s for s in data.get("stages", [])}
    work = [s for s in ("prune", "quant") if s in stages]
    fwd = stages.get("quant", {}).get("forward_seconds")
    return {"status": data.get("status"), "returncode": data.get("returncode"), "stderr_tail": data.get("stderr_tail"),
            "ppl": (data.get("metrics", {}).get("ppl") or {}).get("wikitext2"), "sha256": fp.get("sha256"),
            "zeros": sum((fp.get("zeros") or {}).values()) or None,
            "seconds": {s: stages[s]["seconds"] for s in work}, "forward_seconds": fwd,
            "code_version": data.get("code_version")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="checkout of the old code (a git worktree)")
    ap.add_argument("--new", default=str(ROOT))
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="benchmarks/results/old_vs_new.json")
    ap.add_argument("--runs", default=None, help="where the run directories go (default: a temporary directory)")
    args = ap.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else CASES) if n]
    runs = Path(args.runs or tempfile.mkdtemp(prefix="old_vs_new-"))
    rows = []
    for name in names:
        old_o, new_o = CASES[name]
        new_o = old_o if new_o is SAME else new_o
        res = {}
        for code, checkout, overrides in (("old", args.old, old_o), ("new", args.new, new_o)):
            res[code] = summary(cli([*overrides, "output.save_model=true"], runs / f"{name}-{code}", checkout=checkout))
            res[code]["overrides"] = overrides
        o, n = res["old"], res["new"]
        row = {"name": name, **res, "weights_equal": o["sha256"] is not None and o["sha256"] == n["sha256"],
               "ppl_equal": o["ppl"] is not None and o["ppl"] == n["ppl"], "zeros_equal": o["zeros"] == n["zeros"]}
        rows.append(row)
        print(f"{name}: weights {'equal' if row['weights_equal'] else 'DIFFER'}, ppl old {o['ppl']} new {n['ppl']}, "
              f"seconds old {o['seconds']} new {n['seconds']}", flush=True)
        write(args.out, {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve()), "rows": rows})
    return 0 if all(r["weights_equal"] and r["ppl_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

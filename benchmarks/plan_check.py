"""`compress plan` against measured runs: for each finished run directory, the plan of the same overrides
(computed now, on this machine, rates measured now) beside what the run measured: the peak resident
memory of each phase (the stage entries of results.json; the process's peak is their maximum) and the
seconds of each stage.

    python benchmarks/plan_check.py --out benchmarks/results/plan_check.json \
        RUN_DIR="override override ..." [RUN_DIR="..." ...]

Run it when nothing else computes on the machine (the rates are measured when the plan runs), with the
thread count the runs had (OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from compress.cli import compose
from compress.config import validate
from compress.plan import estimate

from common import write

MiB = 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/plan_check.json")
    ap.add_argument("runs", nargs="+", help='RUN_DIR="overrides" (the overrides the run was started with)')
    a = ap.parse_args()
    rows = []
    for spec in a.runs:
        run_dir, _, overrides = spec.partition("=")
        data = json.loads((Path(run_dir) / "results.json").read_text())
        plan = estimate(validate(compose(shlex.split(overrides))), measure=True)
        stages = {s["name"]: s for s in data["stages"]}
        measured_peak = max(s["peak_memory_mb"] for s in data["stages"])
        phases = []
        for p in plan["phases"]:
            s = stages.get(p["phase"])
            phases.append({"phase": p["phase"], "mode": p["mode"],
                           "planned_mb": None if p["host_bytes"] is None else p["host_bytes"] / MiB,
                           "measured_mb": s["peak_memory_mb"] if s else None,
                           "planned_s": p.get("seconds"), "measured_s": s["seconds"] if s else None})
        calib = [p for p in phases if p["phase"] in ("prune", "quant") and p["measured_s"]]
        row = {"run": run_dir, "overrides": overrides, "planned_peak_mb": plan["peak_host_bytes"] / MiB,
               "measured_peak_mb": measured_peak, "peak_ratio": plan["peak_host_bytes"] / MiB / measured_peak,
               "planned_calib_s": sum(p["planned_s"] for p in calib), "measured_calib_s": sum(p["measured_s"] for p in calib),
               "phases": phases, "rates": plan.get("rates"), "baseline_mb": plan["baseline_bytes"] / MiB}
        row["time_ratio"] = row["planned_calib_s"] / row["measured_calib_s"] if row["measured_calib_s"] else None
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("phases", "rates")}), flush=True)
    write(a.out, {"rows": rows})
    print("| run | planned peak MiB | measured peak MiB | ratio | planned calib s | measured calib s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {Path(r['run']).name} | {r['planned_peak_mb']:,.0f} | {r['measured_peak_mb']:,.0f} | {r['peak_ratio']:.2f} | "
              f"{r['planned_calib_s']:,.0f} | {r['measured_calib_s']:,.0f} | "
              f"{r['time_ratio']:.2f} |" if r["time_ratio"] else "")


if __name__ == "__main__":
    main()

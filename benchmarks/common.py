"""What every benchmark script shares: the machine in words, the yardstick, child processes, results files.

* :func:`machine` — :func:`compress.record.machine_info` (CPU model, cores, memory, GPU, versions);
* :func:`yardstick` — one dense forward over the given tokens (:func:`compress.speed.dense_forward_seconds`):
  every time a benchmark reports is divided by it, measured in the same process;
* :func:`child` — run this script again in a fresh process (``--child ARGS``) and read the JSON line it
  prints last (fresh processes give clean peak-memory readings and no shared caches);
* :func:`cli` — one ``python -m compress`` run in a given checkout, its ``results.json`` read back;
* :func:`write` — a results file, with the machine and the command that produced it.

Scripts import it as ``from common import ...`` (their own directory is on ``sys.path`` when run as
``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

from compress.record import machine_info
from compress.speed import dense_forward_seconds

ROOT = Path(__file__).resolve().parents[1]


def machine() -> Dict:
    return machine_info()


def yardstick(model, ids, batch_size: int = 1) -> float:
    """Seconds of one dense forward of ``model`` over ``ids`` (the ratio's denominator)."""
    return dense_forward_seconds(model, ids, batch_size)


def child(script: str, args: Sequence, env: Optional[Dict] = None, timeout: Optional[float] = None) -> Dict:
    """``python SCRIPT --child ARGS`` in a fresh process; the JSON object it prints last."""
    cp = subprocess.run([sys.executable, script, "--child", *map(str, args)], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=timeout)
    if cp.returncode != 0:
        raise RuntimeError(f"{Path(script).name} --child {' '.join(map(str, args))} failed:\n{cp.stderr[-3000:]}")
    return json.loads(cp.stdout.strip().splitlines()[-1])


def cli(overrides: Sequence[str], run_dir, checkout=ROOT, env: Optional[Dict] = None,
        timeout: Optional[float] = None) -> Dict:
    """``python -m compress OVERRIDES hydra.run.dir=RUN_DIR`` with ``checkout`` as the working directory (its
    source tree is what ``-m`` imports: another checkout, e.g. an older commit, runs its own code); returns
    ``results.json`` with ``returncode`` and the stderr tail added."""
    run_dir = Path(run_dir).resolve()
    cp = subprocess.run([sys.executable, "-m", "compress", *overrides, f"hydra.run.dir={run_dir}"],
                        capture_output=True, text=True, cwd=str(checkout), env={**os.environ, **(env or {})},
                        timeout=timeout)
    res = run_dir / "results.json"
    data = json.loads(res.read_text()) if res.exists() else {}
    data["returncode"] = cp.returncode
    data["stderr_tail"] = cp.stderr[-1500:] if cp.returncode else ""
    return data


def write(path, data: Dict) -> None:
    """``data`` with the machine and the command line, as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), **data}, indent=1) + "\n")

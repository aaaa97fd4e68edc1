"""Sweeps through the CLI (Hydra multirun) on the real model: dense once, skip finished, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ARGS = ["-m", "prune=magnitude", "prune.sparsity=0.3,0.5", "eval.seqlen=128", "eval.max_windows=2"]


def _sweep(d, cwd, extra=()):
    return subprocess.run([sys.executable, "-m", "compress", *ARGS, *extra, f"hydra.sweep.dir={d}"], capture_output=True,
                          text=True, timeout=900, cwd=cwd)


def _results(d):
    return [json.loads(p.read_text()) for p in sorted(d.rglob("results.json"))]


@pytest.mark.integration
def test_sweep_compare_skip_and_resume(tmp_path):
    d = tmp_path / "sweep"
    # start, kill it in the middle of the second cell, re-run: the grid completes without duplicates
    p = subprocess.Popen([sys.executable, "-m", "compress", *ARGS, f"hydra.sweep.dir={d}"], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (d / "1" / "results.json").exists():
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert (d / "1" / "results.json").exists()
    assert json.loads((d / "1" / "results.json").read_text())["status"] == "running"
    r = _sweep(d, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = _results(d)
    assert sorted((x["recipe"] or x["config"]["prune"]["method"], x["status"]) for x in runs) == [
        ("dense", "ok"), ("magnitude", "ok"), ("magnitude", "ok")]
    dense = [x for x in runs if x["recipe"] == "dense"]
    assert len(dense) == 1  # evaluated once for the sweep
    assert "running it again" not in r.stdout + r.stderr  # not re-evaluated by the next cell
    assert {x.get("code_version") for x in runs} == {dense[0]["code_version"]} != {None}
    # a second run skips the finished cells
    t0 = time.time()
    r = _sweep(d, tmp_path)
    assert r.returncode == 0 and r.stdout.count("skipped") == 2
    assert time.time() - t0 < 60
    assert len(_results(d)) == 3
    # compare: table, CSV, PNG
    c = subprocess.run([sys.executable, "-m", "compress", "compare", str(d)], capture_output=True, text=True, timeout=120)
    assert c.returncode == 0, c.stderr
    assert c.stdout.count("| magnitude |") == 2 and "| dense |" in c.stdout
    assert (d / "comparison.csv").read_text().count("\n") == 4
    assert (d / "ppl_vs_sparsity.png").stat().st_size > 1000


def test_compare_refuses_mixed_protocols(tmp_path):
    for i, w in enumerate((2, 3)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps({
            "status": "ok", "config": {"prune": {"method": "none"}}, "metrics": {"ppl": {"wikitext2": 30.0}},
            "protocol": {"wikitext2": {"sha256": "ab", "seqlen": 512, "windows": w, "bos": False}}, "stages": []}))
    c = subprocess.run([sys.executable, "-m", "compress", "compare", str(tmp_path)], capture_output=True, text=True)
    assert c.returncode == 2 and "different evaluation protocols" in c.stderr
    c = subprocess.run([sys.executable, "-m", "compress", "compare", str(tmp_path), "--mixed-protocols"],
                       capture_output=True, text=True)
    assert c.returncode == 0


@pytest.mark.integration
def test_parallel_sweep_with_joblib_launcher(tmp_path):
    """Two cells at once (joblib, 2 processes): both finish, the dense baseline exists exactly once."""
    d = tmp_path / "par"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "compress", "-m", "hydra/launcher=local_parallel", "prune=magnitude",
                        "prune.sparsity=0.3,0.5", "eval.seqlen=128", "eval.max_windows=2", f"hydra.sweep.dir={d}"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = _results(d)
    assert sorted((x["recipe"] or x["config"]["prune"]["method"], x["status"]) for x in runs) == [
        ("dense", "ok"), ("magnitude", "ok"), ("magnitude", "ok")]
    sparsities = sorted(round(x["metrics"]["sparsity"], 3) for x in runs if x["recipe"] != "dense")
    assert sparsities == [0.3, 0.5]
    assert not list(d.rglob(".lock"))


def test_compare_tabulates_zero_shot_speed_and_footprint(tmp_path):
    proto = {"wikitext2": {"sha256": "ab", "seqlen": 512, "windows": 4, "bos": False}}
    cells = [("none", 0.0, 30.0, 0.50, 1000.0, 513.0), ("wanda", 0.5, 60.0, 0.40, 1100.0, 320.0)]
    for i, (method, sp, ppl, acc, tps, fp) in enumerate(cells):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps({
            "status": "ok", "recipe": None if method != "none" else "dense",
            "config": {"prune": {"method": method, "sparsity": sp, "pattern": "unstructured"}},
            "metrics": {"ppl": {"wikitext2": ppl}, "sparsity": sp, "footprint_mb": 513.0, "footprint_sparse_mb": fp,
                        "zero_shot": {"tiny": {"acc": acc, "acc_stderr": 0.1, "acc_norm": acc}},
                        "speed": {"tokens_per_s": tps}},
            "protocol": dict(proto, zero_shot={"lm_eval_version": "0.4.13", "num_fewshot": 0, "limit": None}),
            "stages": []}))
    c = subprocess.run([sys.executable, "-m", "compress", "compare", str(tmp_path)], capture_output=True, text=True)
    assert c.returncode == 0, c.stderr
    assert "acc:tiny" in c.stdout and "tokens/s" in c.stdout and "| 0.4000 |" in c.stdout
    header = (tmp_path / "comparison.csv").read_text().splitlines()[0].split(",")
    assert {"acc:tiny", "acc_norm:tiny", "tokens_per_s", "footprint_sparse_mb"} <= set(header)
    assert "acc_stderr:tiny" not in header
    for png in ("ppl_vs_sparsity.png", "ppl_vs_footprint.png", "ppl_vs_speed.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # accuracies from a different sample limit are not put in one table
    p1 = tmp_path / "1" / "results.json"
    d1 = json.loads(p1.read_text())
    d1["protocol"]["zero_shot"]["limit"] = 8
    p1.write_text(json.dumps(d1))
    c = subprocess.run([sys.executable, "-m", "compress", "compare", str(tmp_path)], capture_output=True, text=True)
    assert c.returncode == 2 and "zero-shot accuracies measured differently" in c.stderr

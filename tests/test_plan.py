"""`compress plan`: estimates from the config alone, and the refusals a run makes before loading."""

import json
import subprocess
import sys

import pytest

from compress.calibration.memory import LinearShape
from compress.cli import compose
from compress.config import validate
from compress.plan import block_shapes, estimate, refuse_if_it_cannot_fit
from compress.core.errors import ConfigError

from .conftest import _tiny, save_tiny

SMALL = ["calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2"]


def test_block_shapes_group_linears_that_read_one_input():
    """q/k/v read the attention input, gate/up the MLP input; o and down their own (from the role map)."""
    model = _tiny("llama")
    from compress.calibration.targets import resolve_targets

    shapes = block_shapes(model, resolve_targets(model).per_block[0])
    groups = {s.name.split(".")[-1]: s.group for s in shapes}
    assert groups["q_proj"] == groups["k_proj"] == groups["v_proj"] != groups["o_proj"]
    assert groups["gate_proj"] == groups["up_proj"] != groups["down_proj"]
    assert len({groups["q_proj"], groups["o_proj"], groups["gate_proj"], groups["down_proj"]}) == 4
    assert all(isinstance(s, LinearShape) and s.out_features > 0 for s in shapes)


def test_plan_cli_prints_every_phase_and_measures_rates(tmp_path):
    ckpt = save_tiny("llama", tmp_path / "llama", layers=3)
    out = tmp_path / "plan.json"
    p = subprocess.run([sys.executable, "-m", "compress", "plan", "model=hf", f"model.name={ckpt}", "prune=sparsegpt",
                        "quant=gptq", "quant.group_size=32", "output.save_model=true", *SMALL, "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    plan = json.loads(out.read_text())
    assert [ph["phase"] for ph in plan["phases"]] == ["prune", "quant", "save", "eval"]
    assert plan["blocks"] == 3 and plan["fits"] == {"host": True, "disk": True}
    assert all(ph["seconds"] >= 0 for ph in plan["phases"]) and plan["seconds"] > 0
    assert plan["rates"]["matmul_gflops"] > 0 and plan["rates"]["steps"]["sparsegpt"] != [0.0, 0.0, 0.0]
    assert "prune     sparsegpt" in p.stdout and "fits" in p.stdout
    assert not (tmp_path / "outputs").exists()  # a dry run: nothing written, nothing loaded


def test_disk_mode_plan_holds_one_block_not_the_model(tmp_path):
    ckpt = save_tiny("llama", tmp_path / "llama", layers=8)
    plans = {}
    for load in ("memory", "disk"):
        cfg = validate(compose(["model=hf", f"model.name={ckpt}", f"model.load={load}", "prune=sparsegpt", *SMALL]))
        plans[load] = estimate(cfg, measure=False, baseline=0.0)
    mem, disk = (plans[k]["phases"][0]["walk"]["host_bytes_beyond_baseline"] for k in ("memory", "disk"))
    b = plans["disk"]["bytes"]
    walk_extra = plans["disk"]["phases"][0]["walk"]["extra_bytes"]
    assert mem == pytest.approx(b["model"] + walk_extra)
    assert disk == pytest.approx(max(b["block"] + walk_extra, 2 * b["block"] + 2 * 4 * 64 * 64 * 4))
    assert disk < mem


def test_a_memory_budget_too_small_is_refused_before_load(tmp_path):
    ckpt = save_tiny("llama", tmp_path / "llama", layers=2)
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "compress", "model=hf", f"model.name={ckpt}", "prune=sparsegpt",
                        "prune.memory_budget=0.0000001", *SMALL, f"hydra.run.dir={run}"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "prune.memory_budget=1e-07 allows 0 MiB" in p.stderr and "needs at least" in p.stderr
    assert not (run / "results.json").exists()


def test_host_and_disk_shortfalls_name_the_numbers():
    base = {"phases": [], "load": {"mode": "memory"}, "peak_host_bytes": 30 * 2**30, "available_host_bytes": 20 * 2**30,
            "disk_bytes": 1, "disk_free_bytes": 2, "fits": {"host": False, "disk": True}}
    with pytest.raises(ConfigError, match=r"about 30720 MiB of host memory at its peak, 20480 MiB are available "
                                          r"\(model.load=disk holds one block at a time"):
        refuse_if_it_cannot_fit(None, base)
    base.update(fits={"host": True, "disk": False}, disk_bytes=5 * 2**30, disk_free_bytes=2**30)
    with pytest.raises(ConfigError, match=r"writes about 5.00 GiB, 1.00 GiB are free"):
        refuse_if_it_cannot_fit(None, base)

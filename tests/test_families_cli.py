"""Each family runs or refuses, through the CLI: tiny random checkpoints of every tested family (saved as
stock Hugging Face checkpoints with a byte-level tokenizer) pruned by ``compress model=hf ...``."""

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from compress.calibration.targets import resolve_targets

from .conftest import ALL_FAMILIES, save_tiny

SMALL = ["calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny(f, root / f) for f in ALL_FAMILIES}


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd)


@pytest.mark.parametrize("prune", [["prune=wanda", "prune.sparsity=0.5"], ["prune=sparsegpt", "prune.pattern=2:4"]],
                         ids=["wanda_50", "sparsegpt_2of4"])
def test_every_family_reaches_the_target_through_the_cli(checkpoints, tmp_path, prune):
    """One sweep over the families' checkpoints (a full CLI run per cell): every cell ends ok with every
    targeted module at its target (N:M exact), and the record names the mode and the check."""
    d = tmp_path / "sweep"
    names = ",".join(str(p) for p in checkpoints.values())
    r = _cli(["-m", "model=hf", f"model.name={names}", *prune, *SMALL, f"hydra.sweep.dir={d}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cells = {}
    for path in d.glob("*/results.json"):
        data = json.loads(path.read_text())
        if data.get("recipe") != "dense":
            cells[data["config"]["model"]["name"]] = data
    assert set(cells) == {str(p) for p in checkpoints.values()}
    linear_counts = {f: len(resolve_targets(AutoModelForCausalLM.from_pretrained(p))) for f, p in checkpoints.items()}
    for family, path in checkpoints.items():
        data = cells[str(path)]
        assert data["status"] == "ok", (family, data["stages"][-1].get("error"))
        rep = data["prune_report"]
        check = rep["check"]
        assert check["ok"] and check["pruned_modules"] == check["targeted_modules"] == rep["targets"]["modules"]
        assert check["targeted_modules"] == linear_counts[family] >= 8  # every linear of every block
        assert rep["mode"]["chosen"] in ("single_pass", "two_pass")
        assert data["metrics"]["sparsity"] == pytest.approx(0.5, abs=2e-3), family
        if "pattern=2:4" in prune[1]:
            assert rep["summary"]["nm_exact"] is True
            assert all(m["nm_ok"] for m in rep["modules"])
        else:
            assert all(m["achieved"] == pytest.approx(0.5, abs=1e-9) for m in rep["modules"])  # Wanda: per row


def test_an_unsupported_family_is_refused_before_pruning(tmp_path):
    """Mixtral's fused experts (3-D weights) and its router are not Linear: the CLI exits non-zero before
    pruning, naming them, and the record says so."""
    import torch
    import transformers as T

    from .conftest import byte_tokenizer

    torch.manual_seed(0)
    cfg = T.MixtralConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=256)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "mixtral")
    byte_tokenizer().save_pretrained(tmp_path / "mixtral")
    out = tmp_path / "run"
    r = _cli(["model=hf", f"model.name={tmp_path / 'mixtral'}", "prune=wanda", *SMALL, f"hydra.run.dir={out}"],
             tmp_path)
    assert r.returncode != 0
    assert "MixtralExperts" in r.stderr and "layers.0.mlp.experts" in r.stderr and "Traceback" not in r.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "failed"
    prune = [s for s in data["stages"] if s["name"] == "prune"][0]
    assert prune["status"] == "failed" and "UnsupportedModelError" in prune["error"]
    assert "modules" not in prune  # refused before pruning anything

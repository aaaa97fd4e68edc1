"""Integration tests on the real embedded default model (SmolLM2-135M), CPU, no network."""

import json
import subprocess
import sys

import pytest

from compress.config import CalibConfig, prune_config
from compress.evaluate import perplexity, size_metrics
from compress.calibration.targets import block_targets
from compress.core.masks import check_nm
from compress.stages.prune import prune_model

pytestmark = pytest.mark.integration

REFERENCE_DENSE_PPL = 28.74  # reference code, first 40 x 512 tokens of WikiText-2 raw test


def test_dense_perplexity_matches_reference(real_model):
    model, tok = real_model
    r = perplexity(model, tok, "wikitext2", seqlen=512, max_windows=40, progress=False)
    assert r["ppl"] == pytest.approx(REFERENCE_DENSE_PPL, rel=0.02)
    assert r["protocol"]["windows"] == 40 and r["protocol"]["tokens_scored"] == 40 * 511
    m = size_metrics(model)
    assert 134_000_000 < m["params_total"] < 135_000_000  # tied embeddings counted once


def test_cli_prune_run_writes_record(tmp_path):
    """The CLI end to end on the real model: magnitude 2:4, short eval."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "compress", "prune=magnitude", "prune.pattern=2:4", "eval.max_windows=2",
                        f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "ok"
    assert data["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert data["metrics"]["ppl"]["wikitext2"] > REFERENCE_DENSE_PPL
    assert [s["name"] for s in data["stages"]] == ["load", "prune", "eval"]
    assert data["protocol"]["wikitext2"]["windows"] == 2
    assert data["prune_report"]["summary"]["nm_exact"] is True
    assert "ppl[wikitext2]" in p.stdout  # summary table


def test_wanda_2of4_on_real_model(tmp_path):
    from compress.config import ModelConfig
    from compress.models import load_model

    model, tok = load_model(ModelConfig(device="cpu"))
    r = prune_model(model, tok, prune_config(method="wanda", pattern="2:4", sequential=True),
                    CalibConfig(nsamples=4, seqlen=256), progress=False)
    assert r.summary()["nm_exact"] and r.achieved() == pytest.approx(0.5, abs=1e-4)
    assert len(r.modules) == 30 * 7
    assert all(0 < m["rel_error"] < 1 for m in r.modules)
    lin = block_targets(model.model.layers[11])["mlp.down_proj"]
    assert check_nm(lin.weight, 2, 4)
    ppl = perplexity(model, tok, "wikitext2", seqlen=512, max_windows=4, progress=False)["ppl"]
    assert REFERENCE_DENSE_PPL < ppl < 1000

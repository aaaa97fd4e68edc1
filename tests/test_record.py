import json

import pytest

from compress import experiment
from compress.config import Config, prune_config
from compress.schema import CalibConfig, EvalConfig
from compress.record import RunRecord, atomic_write_json


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    p = tmp_path / "results.json"
    atomic_write_json(p, {"a": 1})

    def bad_dump(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dump", bad_dump)
    with pytest.raises(RuntimeError):
        atomic_write_json(p, {"a": 2})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["results.json"]


def test_results_survive_a_failing_later_stage(tmp_path, tiny_model, monkeypatch):
    """Prune succeeds, then a later stage fails: results.json keeps the prune stage and its metrics."""
    model = tiny_model("llama")

    class Tok:
        name_or_path = "tiny"
        bos_token_id = 1

        def __call__(self, text, **kw):
            return {"input_ids": [ord(c) % 128 for c in text[:20000]]}

        def save_pretrained(self, p):
            pass

    class FailingTrain:
        name = "train"

        def run(self, ctx):
            raise RuntimeError("simulated crash in train")

    monkeypatch.setitem(experiment.STAGES, "train", FailingTrain)
    cfg = Config(prune=prune_config(method="wanda", sparsity=0.5), calib=CalibConfig(nsamples=4, seqlen=32),
                 eval=EvalConfig(seqlen=32, max_windows=2))
    cfg.train.method = "full"  # only the stage class is faked
    with pytest.raises(RuntimeError, match="simulated"):
        experiment.run_experiment(cfg, tmp_path, model=model, tokenizer=Tok(), print_summary=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["status"] == "failed"
    names = [(s["name"], s["status"]) for s in data["stages"]]
    assert names == [("load", "ok"), ("prune", "ok"), ("train", "failed")]
    prune = data["stages"][1]
    assert prune["seconds"] > 0 and prune["peak_memory_mb"] > 0
    assert prune["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert data["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "simulated" in data["stages"][2]["error"]
    assert data["environment"]["torch"] and data["environment"]["seed"] == 0
    assert (tmp_path / "config.yaml").exists()


def test_record_stage_fields(tmp_path):
    rec = RunRecord(tmp_path, {"x": 1}, device="cpu", seed=3)
    with rec.stage("eval", "perplexity") as info:
        info["extra"] = 1
    d = json.loads((tmp_path / "results.json").read_text())
    s = d["stages"][0]
    assert {"name", "method", "seconds", "peak_memory_mb"} <= set(s) and s["extra"] == 1
    assert d["environment"]["seed"] == 3 and "python" in d["environment"] and "transformers" in d["environment"]


def test_heap_peak_sees_a_freed_allocation():
    import time

    import torch

    from compress.core.memory import HeapPeak

    h = HeapPeak(interval=0.001)
    if h._fn is None:
        pytest.fail("glibc mallinfo2 is missing: HeapPeak cannot measure on this platform")
    before = h._in_use() / 2**20
    with h:
        x = torch.ones(50_000_000)  # 190.7 MiB, freed before the context ends
        time.sleep(0.05)
        del x
    after = h._in_use() / 2**20
    assert h.peak_mb - before > 185
    assert after - before < 50  # gone again: the peak is not what is still held

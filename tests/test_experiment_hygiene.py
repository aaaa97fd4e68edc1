"""Results that stay trustworthy: the sweep's skip key includes the code version, process-global torch
switches are scoped to the stage that sets them, a local eval file's metric key is its stem, and the
seeded path (calibration sampling through masks) is deterministic end to end. Tiny models, no network."""

import json

import pytest
import torch

from compress import experiment
from compress.calibration.targets import resolve_targets
from compress.config import Config, prune_config
from compress.core.errors import ConfigError
from compress.schema import CalibConfig, EvalConfig, OutputConfig

from .conftest import _tiny, byte_tokenizer


def _cfg(**kw):
    base = dict(prune=prune_config(method="wanda", sparsity=0.5), calib=CalibConfig(nsamples=4, seqlen=32),
                eval=EvalConfig(seqlen=32, max_windows=2))
    base.update(kw)
    return Config(**base)


def _run(cfg, out, seed=0):
    return experiment.run_experiment(cfg, out, model=_tiny("llama", seed=seed, vocab=260), tokenizer=byte_tokenizer(),
                                     print_summary=False)


def test_a_cell_finished_by_other_code_is_rerun_unless_reuse_is_asked(tmp_path, capsys):
    out = tmp_path / "cell"
    first = _run(_cfg(), out)
    assert first["status"] == "ok" and first["code_version"]
    # the same config, same code: skipped
    again = _run(_cfg(), out)
    assert again["started"] == first["started"] and "skipped" in capsys.readouterr().out
    # pretend another code version finished it: re-run by default
    data = json.loads((out / "results.json").read_text())
    data["code_version"] = "0.0.1+0123456789ab"
    (out / "results.json").write_text(json.dumps(data))
    rerun = _run(_cfg(), out)
    assert "running it again" in capsys.readouterr().out
    assert rerun["code_version"] == first["code_version"] and rerun["started"] != first["started"]  # a new run
    assert json.loads((out / "results.json").read_text())["code_version"] == first["code_version"]
    # ... and reused with the opt-in, which is not part of the cell's identity
    data = json.loads((out / "results.json").read_text())
    data["code_version"] = "0.0.1+0123456789ab"
    (out / "results.json").write_text(json.dumps(data))
    reused = _run(_cfg(output=OutputConfig(reuse_other_code=True)), out)
    assert reused["code_version"] == "0.0.1+0123456789ab" and "skipped" in capsys.readouterr().out
    assert experiment.config_hash(reused["config"]) == reused["config_hash"]


def test_compare_says_which_code_produced_each_row(tmp_path):
    from compress import compare

    _run(_cfg(), tmp_path / "a")
    rows = compare.rows_from_runs(compare.load_runs([str(tmp_path)]))
    assert rows[0]["code_version"] == json.loads((tmp_path / "a" / "results.json").read_text())["code_version"]
    header = [c.strip() for c in compare.markdown_table(rows).splitlines()[0].split("|")]
    assert "code" in header


def test_global_torch_switches_do_not_leak_out_of_a_stage(tmp_path, monkeypatch):
    """A stage that turns TF32 on and lowers the matmul precision (as the trainer does on CUDA) leaves them
    as they were for the next stage and the evaluation."""
    from compress.config import quant_config
    from compress.stages import StageResult

    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    seen = {}

    class Flips:
        name = "train"

        def run(self, ctx):
            torch.backends.cuda.matmul.allow_tf32 = not before[0]
            torch.set_float32_matmul_precision("medium" if before[1] != "medium" else "high")
            return StageResult(ctx.model)

    class Looks:
        name = "quant"

        def run(self, ctx):
            seen["next"] = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
            return StageResult(ctx.model)

    monkeypatch.setitem(experiment.STAGES, "train", Flips)
    monkeypatch.setitem(experiment.STAGES, "quant", Looks)
    cfg = _cfg(quant=quant_config("rtn"))
    cfg.train.method = "full"  # only the stage classes are faked
    data = _run(cfg, tmp_path)
    assert data["status"] == "ok" and [s["name"] for s in data["stages"]][1:4] == ["prune", "train", "quant"]
    assert seen["next"] == before
    assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()) == before


def test_local_eval_file_metric_key_is_its_stem(tmp_path):
    corpus = tmp_path / "data" / "my_corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    data = _run(_cfg(prune=prune_config(), eval=EvalConfig(datasets=["wikitext2", str(corpus)], seqlen=32,
                                                           max_windows=2)), tmp_path / "run")
    assert set(data["metrics"]["ppl"]) == {"wikitext2", "my_corpus"}
    assert data["protocol"]["my_corpus"]["source"] == str(corpus)


def test_two_eval_files_with_one_stem_are_refused():
    with pytest.raises(ConfigError, match="metric key"):
        EvalConfig(datasets=["/a/x.txt", "/b/x.jsonl"])


def _masks(model):
    return {n: (m.weight == 0).clone() for n, m in resolve_targets(model).flat().items()}


def test_seeded_path_end_to_end_is_deterministic(tmp_path):
    """From calibration sampling (calib.seed picks the windows of the embedded text) through the masks:
    the same seed gives identical masks, another seed different ones."""
    masks = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        model = _tiny("llama", seed=3, vocab=260)
        cfg = _cfg(prune=prune_config(method="sparsegpt", sparsity=0.5, blocksize=32),
                   calib=CalibConfig(nsamples=4, seqlen=32, seed=seed))
        data = experiment.run_experiment(cfg, tmp_path / name, model=model, tokenizer=byte_tokenizer(),
                                         print_summary=False)
        assert data["status"] == "ok"
        masks[name] = (_masks(model), data["protocol"]["calibration"])
    (a, ca), (b, cb), (c, cc) = masks["a"], masks["b"], masks["c"]
    assert ca["windows_sha256"] == cb["windows_sha256"] != cc["windows_sha256"]  # the sampled windows differ
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)

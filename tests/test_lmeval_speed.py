"""Zero-shot evaluation through lm-eval on the shipped local task (offline), and the speed metric."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from compress.lmeval import TASK_DIR, zero_shot


def _our_accuracy(model, tok, path):
    """Multiple-choice accuracy computed independently of lm-eval: sum of the continuation's log-probs
    (" " + choice after "Question: ...\\nAnswer:"), argmax over choices; acc_norm divides by the choice length."""
    hits = hits_norm = n = 0
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        ctx = f"Question: {doc['question']}\nAnswer:"
        ctx_ids = tok(ctx, add_special_tokens=False).input_ids
        lls = []
        for choice in doc["choices"]:
            whole = tok(ctx + " " + choice, add_special_tokens=False).input_ids
            cont = whole[len(ctx_ids):]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole]), use_cache=False).logits[0].float()
            logp = F.log_softmax(logits[len(ctx_ids) - 1:len(whole) - 1], dim=-1)
            lls.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
        lls = torch.tensor(lls)
        norm = lls / torch.tensor([float(len(c)) for c in doc["choices"]])
        hits += int(lls.argmax()) == doc["answer"]
        hits_norm += int(norm.argmax()) == doc["answer"]
        n += 1
    return hits / n, hits_norm / n, n


@pytest.mark.integration
def test_lm_eval_local_task_matches_independent_scoring(real_model):
    model, tok = real_model
    res = zero_shot(model, tok, ["compress_tiny_mc"])
    m = res["metrics"]["compress_tiny_mc"]
    acc, acc_norm, n = _our_accuracy(model, tok, TASK_DIR / "compress_tiny_mc.jsonl")
    assert n == 24
    assert m["acc"] == pytest.approx(acc, abs=1e-9)
    assert m["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    assert acc > 0.25 + 0.2  # the real model is well above chance on these easy questions
    p = res["protocol"]
    assert p["lm_eval_version"] and p["num_fewshot"] == 0
    assert p["task_configs"]["compress_tiny_mc"]["dataset_path"] == "json"
    assert p["n_samples"]["compress_tiny_mc"]["effective"] == 24


@pytest.mark.integration
def test_lm_eval_missing_package_says_how_to_install(monkeypatch, real_model):
    import compress.lmeval as L

    monkeypatch.setattr(L, "lm_eval_version", lambda: None)
    with pytest.raises(RuntimeError, match="pip install"):
        L.zero_shot(*real_model, ["compress_tiny_mc"])


@pytest.mark.integration
def test_cli_zero_shot_and_speed_recorded(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "compress", "prune=magnitude", "prune.pattern=2:4", "eval.max_windows=1",
                        "eval.seqlen=128", "eval.zero_shot.tasks=[compress_tiny_mc]", "eval.zero_shot.limit=8",
                        "eval.speed=true", "eval.speed_batch_size=1", "eval.speed_seqlen=64", f"hydra.run.dir={out}"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in data["stages"]] == ["load", "prune", "eval", "zero_shot", "speed"]
    zs = data["metrics"]["zero_shot"]["compress_tiny_mc"]
    assert 0.0 <= zs["acc"] <= 1.0 and "acc_stderr" in zs
    assert data["protocol"]["zero_shot"]["limit"] == 8
    assert data["protocol"]["zero_shot"]["n_samples"]["compress_tiny_mc"]["effective"] == 8
    sp = data["metrics"]["speed"]
    assert sp["tokens_per_s"] > 0 and sp["kernels"] == "dense" and sp["device"] == "cpu"
    assert "sparse24_tokens_per_s" not in sp  # no 2:4 kernels on CPU
    # sparse storage drops the zeros of the prunable linears (fp32) and adds a 1-bit mask per weight
    m = data["metrics"]
    expected_saving = m["prunable_params"] * (m["sparsity"] * 4 - 1 / 8) / 2**20
    assert m["footprint_mb"] - m["footprint_sparse_mb"] == pytest.approx(expected_saving, rel=1e-6)
    assert m["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "zero-shot (lm-eval)" in p.stdout and "prefill speed" in p.stdout


def test_semi_structured_refuses_cpu_clearly(tiny_model):
    from compress.speed import prefill_throughput, to_semi_structured

    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="compute capability"):
        to_semi_structured(model)
    r = prefill_throughput(model, batch_size=2, seqlen=16, iters=3, warmup=1)
    assert r["tokens_per_s"] > 0 and r["batch_size"] == 2 and r["device"] == "cpu"

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from compress.data import (DataUnavailable, calibration_windows, file_sha256, load_text, sample_starts)
from compress.evaluate import perplexity_from_ids, size_metrics

README_SHA = {  # from the data README shipped next to the files
    "wiki.test.raw": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
}


def test_embedded_files_are_the_documented_ones():
    from compress.data import DATA_DIR

    for name, sha in README_SHA.items():
        assert file_sha256(DATA_DIR / name) == sha
    assert "CC BY-SA" in (DATA_DIR / "README.md").read_text() or "Creative Commons" in (DATA_DIR / "README.md").read_text()


def test_eval_and_calibration_text_differ_and_crlf_normalised():
    ev = load_text("wikitext2", role="eval")
    ca = load_text("wikitext2", role="calib")
    assert ev.split == "test" and ca.split == "validation"
    assert "\r" not in ev.text
    assert ev.sha256 != ca.sha256


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_sampler_reproduces_reference_rule(seed):
    ntokens, nsamples, seqlen = 10_000, 16, 128
    random.seed(seed)
    expected = [random.randint(0, ntokens - seqlen - 1) for _ in range(nsamples)]
    state = random.getstate()
    assert sample_starts(ntokens, nsamples, seqlen, seed) == expected
    assert random.getstate() == state  # no global side effect
    ids = torch.arange(ntokens)
    w = calibration_windows(ids, nsamples, seqlen, seed)
    assert w.shape == (nsamples, seqlen)
    assert [int(r[0]) for r in w] == expected and bool((w[:, 1:] - w[:, :-1] == 1).all())


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello\r\nworld")
    assert load_text(str(tmp_path / "a.txt")).text == "hello\nworld"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")).text == "one\n\ntwo"
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "c.parquet")
    assert load_text(str(tmp_path / "c.parquet")).text == "x\n\ny"
    with pytest.raises(DataUnavailable, match="field"):
        load_text(str(tmp_path / "b.jsonl"), text_field="content")


def test_online_sources_fail_fast_offline(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(DataUnavailable, match="offline|cannot be reached"):
        load_text("c4", role="calib")
    assert time.time() - t0 < 5
    with pytest.raises(DataUnavailable, match="neither"):
        load_text("/no/such/file.txt")


def _manual_ppl(model, ids, seqlen, nwin):
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(nwin):
            w = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            logits = model(w).logits[0, :-1]
            nll += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            n += seqlen - 1
    return math.exp(nll / n)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_perplexity_matches_manual_and_is_batch_size_independent(tiny_model, family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (32 * 9 + 5,), generator=torch.Generator().manual_seed(1))
    ref = _manual_ppl(model, ids, 32, 9)
    results = [perplexity_from_ids(model, ids, 32, None, bs, progress=False) for bs in (1, 2, 4, 9)]
    for r in results:
        assert r["windows"] == 9 and r["tokens"] == 9 * 31
        assert r["ppl"] == pytest.approx(ref, rel=1e-5)
    assert perplexity_from_ids(model, ids, 32, 3, 2, progress=False)["windows"] == 3


def test_bos_is_context_not_scored(tiny_model):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(2))
    r = perplexity_from_ids(model, ids, 32, None, 1, bos_token_id=1, progress=False)
    assert r["tokens"] == 64  # every window token is scored once, BOS predicts the first


def test_size_metrics_count_tied_weights_once(tiny_model):
    model = tiny_model("llama")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    m = size_metrics(model)
    assert m["params_total"] == sum(p.numel() for p in model.parameters())  # parameters() dedups ties
    assert m["sparsity"] == 0.0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    m2 = size_metrics(model)
    assert m2["params_nonzero"] == m["params_nonzero"] - model.model.layers[0].mlp.down_proj.weight.numel()
    assert m2["sparsity"] == pytest.approx(model.model.layers[0].mlp.down_proj.weight.numel() / m["prunable_params"])


def test_sparse_footprint_counts_values_plus_bitmask(tiny_model):
    model = tiny_model("llama")
    m = size_metrics(model)
    assert m["footprint_sparse_mb"] == pytest.approx(m["footprint_mb"])  # nothing to save when dense
    w = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w[:, ::2] = 0  # half the weights
    m2 = size_metrics(model)
    saved = (w.numel() * 4 - (w.numel() // 2 * 4 + w.numel() // 8)) / 2**20
    assert m["footprint_mb"] - m2["footprint_sparse_mb"] == pytest.approx(saved, rel=1e-9)

"""Activation quantization (W8A8 int8, FP8, W4A8) in the quant stage, SmoothQuant and rotations as transforms:
the grids' conventions, the named schemes and their refusals, the saved compressed-tensors checkpoints that
stock ``from_pretrained`` reloads (and whose forward applies the same activation quantization as ours,
logits equal), SmoothQuant's error ordering where activations have outlier channels, the rotated float model
unchanged on several families (and refused by name where it cannot be), N:M kept through W8A8."""

import json
import subprocess
import sys

import pytest
import torch

from compress.calibration.blocks import find_blocks
from compress.calibration.targets import resolve_targets
from compress.config import Config, make_config, prune_config, quant_config
from compress.core.activations import attached, detach
from compress.core.errors import ConfigError, UnsupportedModelError
from compress.core.grid import FP8_MAX, ActSpec, GridSpec, act_fake_quant, on_grid, quantize, rtn
from compress.core.hadamard import hadamard, rotation
from compress.core.masks import check_nm
from compress.core.modules import weight_matrix
from compress.schema import CalibConfig, EvalConfig
from compress.stages.quant import quantize_model
from compress.transforms.rotation import Rotation

from .conftest import _tiny, byte_tokenizer, reload_check_cli, save_tiny
from .test_quant_stage import _reload


def _ids(n=8, seqlen=32, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


# ----------------------------------------------------------------- grids
def test_fp8_and_per_tensor_grids():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    w[3, 5] = 40.0  # an outlier sets the per-tensor scale
    spec = GridSpec(8, True, -1, type="float")
    deq, scale, zero = rtn(w, spec)
    assert zero is None and torch.allclose(scale.squeeze(1), w.abs().amax(1) / FP8_MAX)
    assert on_grid(deq, scale, zero, spec)
    codes = quantize(w, scale, None, 8, "float")  # every code is a float8 E4M3 value, and deq = code * scale
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float()) and torch.equal(deq, codes * scale)
    assert float((deq - w).abs().max()) < 0.07 * float(w.abs().max())
    t = GridSpec(8, True, 0)
    deq_t, scale_t, _ = rtn(w, t)
    assert torch.all(scale_t == scale_t[0, 0]) and float(scale_t[0, 0]) == pytest.approx(40.0 / 127.5)
    assert on_grid(deq_t, scale_t, None, t)
    # the outlier makes per-tensor int8 worse than per-channel int8 on every other row
    deq_c, _, _ = rtn(w, GridSpec(8, True, -1))
    rows = [r for r in range(16) if r != 3]
    assert float((deq_t - w)[rows].square().sum()) > 10 * float((deq_c - w)[rows].square().sum())


def test_activation_fake_quant_conventions():
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    x[0, 1, 7] = 25.0
    q = act_fake_quant(x, ActSpec("int", "token", True))
    s = x.abs().amax(-1, keepdim=True) / 127.5  # compressed-tensors' symmetric int8 scale
    assert torch.allclose(q, torch.round(x / s).clamp(-128, 127) * s)
    assert float((q - x).abs().max()) <= float(s.max()) / 2 + 1e-6
    # per tensor: one scale, the outlier's token costs every other token precision
    qt = act_fake_quant(x, ActSpec("int", "tensor", True))
    assert float((qt - x)[1].abs().mean()) > 2 * float((q - x)[1].abs().mean())
    f = act_fake_quant(x, ActSpec("float", "token", True))
    sf = x.abs().amax(-1, keepdim=True) / FP8_MAX
    assert torch.equal(f, (x / sf).to(torch.float8_e4m3fn).float() * sf)
    static = act_fake_quant(x, ActSpec("float", "tensor", False), scale=torch.tensor(1.0 / FP8_MAX))
    assert float(static.abs().max()) <= 1.0 + 1e-6  # saturated at the static range


@pytest.mark.parametrize("n", [12, 20, 28, 36, 60, 64, 576, 960, 3072])
def test_hadamard_orders(n):
    h, how = hadamard(n)
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64)) and set(h.unique().tolist()) == {-1.0, 1.0}
    q, desc = rotation(n, seed=3)
    assert "Hadamard" in desc and torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert hadamard(100) is None and "random orthogonal" in rotation(100)[1]


# ----------------------------------------------------------------- configs
def test_schemes_set_their_keys_and_conflicts_are_refused():
    c = quant_config("gptq", scheme="w8a8")
    assert (c.bits, c.group_size, c.type, c.act) == (8, -1, "int", ActSpec("int", "token", True))
    assert c.bits_label() == "W8A8" and "a:int8 token dynamic" in c.label()
    f = quant_config("rtn", scheme="fp8")
    assert (f.type, f.group_size, f.act) == ("float", 0, ActSpec("float", "tensor", False)) and f.bits_label() == "FP8"
    assert quant_config("rtn", scheme="w4a16").bits_label() == "W4A16"
    assert quant_config("rtn", scheme="w4a8", group_size=32).group_size == 32  # 4-bit schemes keep the group
    with pytest.raises(ConfigError, match="quant.scheme=w8a8 sets quant.group_size=-1, but quant.group_size=128"):
        quant_config("gptq", scheme="w8a8", group_size=128)
    with pytest.raises(ConfigError, match="static activation scales"):
        quant_config("rtn", activations="int8", act_dynamic=False)
    with pytest.raises(ConfigError, match="FP8 E4M3: it needs quant.bits=8"):
        quant_config("rtn", type="float", bits=4)
    with pytest.raises(ConfigError, match="quant.scheme.*w8a8"):
        quant_config("rtn", scheme="int8")
    with pytest.raises(ConfigError, match="quant.activations"):
        quant_config("rtn", activations="int4")
    with pytest.raises(ConfigError, match="transform.online=true"):
        make_config("transform", "rotation", online=True)
    assert make_config("transform", "rotation", matrix="random").label() == "rotation random +v"
    with pytest.raises(ConfigError, match="transform.matrix"):
        make_config("transform", "rotation", matrix="hadamard2")


def test_disk_mode_refuses_activations_and_rotations_before_load(tmp_path):
    ckpt = save_tiny("llama", tmp_path / "llama")
    for extra, msg in ((["quant.scheme=w8a8"], "quant.activations=int8"),
                       (["quant.group_size=16", "transform=rotation"], "transform=rotation")):
        p = subprocess.run([sys.executable, "-m", "compress", "model=hf", f"model.name={ckpt}", "model.load=disk",
                            "quant=rtn", *extra, f"hydra.run.dir={tmp_path / 'r'}"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert p.returncode == 2 and msg in p.stderr, p.stderr[-2000:]


# ----------------------------------------------------------------- the stage, saving, stock reload
def _reload_logits(d, ids, tmp_path):
    """Stock from_pretrained in a process that never imports compress (test_quant_stage's helper)."""
    got = _reload(d, ids, tmp_path)
    return got["logits"], got["weights"]


@pytest.mark.parametrize("scheme,fmt", [("w8a8", "int-quantized"), ("fp8_dynamic", "float-quantized"),
                                        ("fp8", "float-quantized"), ("w4a8", "int-quantized")])
def test_activation_schemes_save_and_stock_reload_applies_them(tmp_path, scheme, fmt):
    """GPTQ with a scheme through the experiment: the in-memory model quantizes its linears' inputs (logits
    differ from the weight-only model's); the saved compressed-tensors checkpoint states the scheme, and a
    process that never imports compress reloads it with stock from_pretrained: weights equal, and its logits
    equal ours *with* the activation quantization (transformers' compressed-tensors integration applies it
    on CPU), so the reload's perplexity is the run's."""
    from compress import experiment

    model = _tiny("llama", vocab=260)
    extra = {"group_size": 16} if scheme == "w4a8" else {}
    cfg = Config(quant=quant_config(method="gptq", scheme=scheme, blocksize=32, **extra),
                 calib=CalibConfig(nsamples=4, seqlen=32), eval=EvalConfig(seqlen=32, max_windows=2))
    cfg.output.save_model = True
    data = experiment.run_experiment(cfg, tmp_path / "run", model=model, tokenizer=byte_tokenizer(), print_summary=False)
    assert data["status"] == "ok"
    rep = data["quant_report"]
    assert rep["summary"]["bits_label"] == cfg.quant.bits_label() and rep["activations"]["modules"] == 14
    assert len(attached(model)) == 14
    ids = _ids(2, 16)
    with_act = _logits(model, ids)
    detach(model)
    weight_only = _logits(model, ids)
    assert float((with_act - weight_only).abs().max()) > 1e-4  # the activations really are quantized
    d = tmp_path / "run" / "model"
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == fmt and group["input_activations"]["dynamic"] is cfg.quant.act_dynamic
    assert group["input_activations"]["type"] == cfg.quant.act.type
    logits, weights = _reload_logits(d, ids, tmp_path)
    for n, p in model.named_parameters():
        if "layers" in n:
            assert torch.equal(weights[n], p.detach().float()), n
    assert torch.allclose(logits, with_act, atol=1e-5, rtol=0), float((logits - with_act).abs().max())
    check = reload_check_cli(tmp_path / "run")
    assert check["ok"] and check["ppl_rel_diff"] <= 1e-6, check


def _with_outliers(model, scale=40.0):
    """The same function with a few activation channels much larger (the norms scale them up, the linears
    reading them scale their columns down), as in real LLMs."""
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for b in blocks:
            for norm, lins in ((b.input_layernorm, (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj)),
                               (b.post_attention_layernorm, (b.mlp.gate_proj, b.mlp.up_proj))):
                norm.weight[:3] *= scale
                for lin in lins:
                    lin.weight[:, :3] /= scale
    return model


@pytest.mark.parametrize("search", [False, True])
def test_smoothquant_beats_plain_w8a8_with_outlier_channels(search):
    """Per-tensor static int8 activations suffer most from outlier channels: SmoothQuant (alpha 0.5, or
    searched) + RTN W8A8 has a smaller logits error than RTN W8A8 alone, its folded float model is the
    same function (the stage checks 1e-4 per block), and the outlier channels' range really shrank."""
    ids = _ids(16)
    err, reports = {}, {}
    for sq in (False, True):
        model = _with_outliers(_tiny("llama", seed=4))
        ref = _logits(model, ids)
        tf = [make_config("transform", "smoothquant", search=search, grid=5)] if sq else []
        model, rep = quantize_model(model, None, quant_config("rtn", scheme="w8a8_static"), calib_ids=ids,
                                    transforms=tf, progress=False)
        assert rep.check["on_grid"] and rep.activations["modules"] == 14
        reports[sq] = rep
        err[sq] = float((_logits(model, ids) - ref).norm() / ref.norm())
    groups = reports[True].transforms[0]["groups"]
    assert {g["group"] for g in groups} == {"attn_in", "mlp_in"}
    assert all(g["act_max_after"] < 0.5 * g["act_max_before"] for g in groups)
    assert all(t["fold_drift"] < 1e-4 for t in reports[True].transforms)
    assert err[True] < 0.7 * err[False], err


# ----------------------------------------------------------------- rotations
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_rotation_leaves_the_float_model_unchanged(family):
    """Norms folded, residual stream rotated (embeddings, readers, writers, head), values and o rotated per
    head: logits equal within 1e-4 relative (fp32), every block linear changed, the tied head untied."""
    model = _tiny(family, vocab=260)
    with torch.no_grad():  # norm weights other than ones (a fresh model's), so that folding them matters
        g = torch.Generator().manual_seed(5)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    ids = _ids(2, 24)
    ref = _logits(model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    info = Rotation(make_config("transform", "rotation")).prepare(model)
    got = _logits(model, ids)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    assert info["untied_head"] is tied and info["rotate_v"].startswith("Hadamard 16")
    assert not model.config.tie_word_embeddings
    for n, p in model.named_parameters():
        if "proj" in n and n.endswith("weight"):
            assert not torch.allclose(p, before[n]), n


@pytest.mark.parametrize("family,msg", [("gemma3", "post_attention_layernorm"), ("opt", "has a bias"),
                                        ("cohere2", "not an RMSNorm")])
def test_rotation_is_refused_by_name_where_it_cannot_apply(family, msg):
    with pytest.raises(UnsupportedModelError, match=msg):
        Rotation(make_config("transform", "rotation")).prepare(_tiny(family, vocab=260))


def test_rotation_with_rtn_needs_no_calibration():
    """RTN and the rotation use no calibration data: the stage runs without any (no walk), W8A8 static aside."""
    model = _tiny("llama", vocab=260)
    ids = _ids(2, 16)
    ref = _logits(model, ids)
    model, rep = quantize_model(model, None, quant_config("rtn", scheme="w4a8", group_size=16),
                                transforms=[make_config("transform", "rotation")], progress=False)
    assert rep.prepared["rotation"]["logits_rel_diff"] < 1e-4 and rep.check["on_grid"] and not rep.calibration
    assert 0 < float((_logits(model, ids) - ref).norm() / ref.norm()) < 0.5


def test_rotation_works_a_chunk_of_rows_at_a_time(monkeypatch):
    """``W Q`` and ``Q^T W`` in place, a few rows at a time (the float64 working set bounded, not a copy of
    the embeddings): equal to the whole-matrix product; the rotated model is the same with 3-row chunks."""
    import compress.transforms.rotation as rot

    q = rotation(64, seed=1)[0]
    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    want_right, want_left = (w.double() @ q).float(), (q.t() @ w.t().double()).float()
    monkeypatch.setattr(rot, "CHUNK_BYTES", 8 * 64 * 7)
    a, b = w.clone(), w.t().contiguous()
    assert rot._right(a, q) == 7
    rot._right(b.t(), q)  # the writers' path: a transposed view, updated in place
    assert torch.allclose(a, want_right, atol=1e-6) and torch.allclose(b, want_left, atol=1e-6)
    models = []
    for chunk in (8 * 64 * 3, 64 * 2**20):
        monkeypatch.setattr(rot, "CHUNK_BYTES", chunk)
        m = _tiny("llama", vocab=260)
        info = Rotation(make_config("transform", "rotation")).prepare(m)
        models.append((m, info["chunk_rows"]))
    assert [r for _, r in models] == [3, 64 * 2**20 // (8 * 64)]
    for (n, p), p2 in zip(models[0][0].named_parameters(), models[1][0].parameters()):
        assert torch.allclose(p, p2, atol=1e-6), n


def test_plan_counts_the_rotations_untied_head(tmp_path):
    """``compress plan`` with ``transform=rotation``: a transform phase before the quant walk; the untied
    head (tied embeddings) is added to the model every later phase holds."""
    from compress.cli import compose
    from compress.config import validate
    from compress.plan import estimate

    ckpt = save_tiny("llama", tmp_path / "llama", layers=2)
    small = ["calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2"]
    plans = {}
    for tf in ("none", "rotation"):
        cfg = validate(compose(["model=hf", f"model.name={ckpt}", "quant=gptq", "quant.group_size=16",
                                f"transform={tf}", *small]))
        plans[tf] = estimate(cfg, measure=False, baseline=0.0)
    phases = {k: {p["phase"]: p for p in v["phases"]} for k, v in plans.items()}
    b = plans["rotation"]["bytes"]
    head = b["embeddings"]  # tied: the head is a copy of the embeddings once untied
    assert list(phases["rotation"]) == ["transform", "quant", "eval"] and "transform" not in phases["none"]
    t = phases["rotation"]["transform"]
    assert t["added_bytes"] == head and t["host_bytes"] > b["model"] + head
    for ph in ("quant", "eval"):
        assert phases["rotation"][ph]["host_bytes"] == pytest.approx(phases["none"][ph]["host_bytes"] + head)


def test_rotation_refuses_a_pruned_model():
    from compress.stages.prune import prune_model

    model = _tiny("llama", vocab=260)
    prune_model(model, None, prune_config(method="magnitude", sparsity=0.5), progress=False)
    with pytest.raises(UnsupportedModelError, match="pruned"):
        Rotation(make_config("transform", "rotation")).prepare(model)


def test_rotation_gptq_w4a8_through_the_cli_reloads_stock(tmp_path):
    """transform=rotation with GPTQ and 8-bit activations through the CLI: the untied head is saved, the
    checkpoint reloads stock, the reload's ppl is the run's."""
    ckpt = save_tiny("llama", tmp_path / "ckpt")
    d = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "compress", "model=hf", f"model.name={ckpt}", "quant=gptq",
                        "quant.scheme=w4a8", "quant.group_size=16", "transform=rotation", "output.save_model=true",
                        "calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2",
                        f"hydra.run.dir={d}"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((d / "results.json").read_text())
    rep = data["quant_report"]
    assert rep["prepared"]["rotation"]["untied_head"] and rep["prepared"]["rotation"]["logits_rel_diff"] < 1e-4
    assert rep["summary"]["transforms"] == ["rotation"] and rep["summary"]["bits_label"] == "W4A8"
    cfgj = json.loads((d / "model" / "config.json").read_text())
    assert cfgj["tie_word_embeddings"] is False
    assert reload_check_cli(d, tmp_path)["ppl_rel_diff"] <= 1e-6


# ----------------------------------------------------------------- composition
def test_two_four_sparsity_survives_w8a8_and_the_reload(tmp_path):
    """SparseGPT 2:4 then SmoothQuant + GPTQ W8A8: 2:4 exact in every linear after the stage and in the
    stock reload's weights."""
    from compress import experiment

    model = _tiny("llama", vocab=260)
    cfg = Config(prune=prune_config(method="sparsegpt", pattern="2:4", blocksize=32),
                 quant=quant_config(method="gptq", scheme="w8a8", blocksize=32),
                 transform=make_config("transform", "smoothquant"),
                 calib=CalibConfig(nsamples=4, seqlen=32), eval=EvalConfig(seqlen=32, max_windows=2))
    cfg.output.save_model = True
    data = experiment.run_experiment(cfg, tmp_path / "run", model=model, tokenizer=byte_tokenizer(), print_summary=False)
    assert data["status"] == "ok" and data["metrics"]["quant_check"]["nm_exact"] is True
    flat = resolve_targets(model).flat()
    assert all(check_nm(weight_matrix(m), 2, 4) for m in flat.values())
    _, weights = _reload_logits(tmp_path / "run" / "model", _ids(1, 8), tmp_path)
    names = resolve_targets(model).qualified_names()
    assert len(names) == 14
    for n in names:
        assert check_nm(weights[n + ".weight"], 2, 4), n


@pytest.mark.integration
def test_rotation_leaves_the_default_model_unchanged(real_model):
    """SmolLM2-135M (576 = H_72 x H_8, GQA 9/3, tied embeddings): rotated in fp32, its logits on real text are
    the original's within 1e-4 relative."""
    import copy

    model, tok = real_model
    model = copy.deepcopy(model)
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.",
              return_tensors="pt").input_ids
    ref = _logits(model, ids)
    info = Rotation(make_config("transform", "rotation")).prepare(model)
    got = _logits(model, ids)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    assert info["untied_head"] and "H_72" in info["rotation"] and info["norms_folded"] == 61

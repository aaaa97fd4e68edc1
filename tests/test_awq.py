"""AWQ as a block transform of the quant stage: folding the searched scales leaves the float model unchanged,
AWQ + RTN beats RTN alone where activations have outlier channels, the run saves a compressed-tensors
checkpoint with the scales folded in that reloads stock, and the transform is refused where it cannot apply."""

import json
import subprocess
import sys

import pytest
import torch

from compress.calibration.blocks import capture_block_inputs, find_blocks
from compress.calibration.targets import resolve_targets
from compress.config import Config, make_config, quant_config
from compress.core.errors import ConfigError
from compress.stages.quant import quantize_model
from compress.transforms.awq import AWQ

from .conftest import reload_check_cli, save_tiny


def _ids(n=8, seqlen=32, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _with_outliers(model):
    """The same function with a few activation channels 30x larger: the norm before q/k/v and before gate/up
    scales them up and the linears reading them scale their columns down (what real LLMs look like)."""
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for b in blocks:
            for norm, lins in ((b.input_layernorm, (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj)),
                               (b.post_attention_layernorm, (b.mlp.gate_proj, b.mlp.up_proj))):
                norm.weight[:4] *= 30
                for lin in lins:
                    lin.weight[:, :4] /= 30
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3", "opt"])
def test_folding_the_scales_leaves_the_float_model_unchanged(tiny_model, family):
    """Every block's searched scales folded into its norms / linears (nothing quantized yet): the float model's
    logits are unchanged within 1e-5 (relative, fp32), and the weights really changed."""
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    awq = AWQ(make_config("transform", "awq", grid=5), quant_config("rtn", bits=4, group_size=16).spec)
    awq.prepare(model)
    _, blocks = find_blocks(model)
    cap = capture_block_inputs(model, ids, batch_size=4)
    hidden = cap.hidden
    for i, block in enumerate(blocks):
        inputs = cap.block(i, hidden)
        info = awq.transform_block(i, block, inputs, resolve_targets(model).per_block[i])
        assert info["groups"] and info["fold_drift"] < 1e-5
        hidden = [inputs.call(block, b) for b in range(len(inputs))]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("scope", ["module", "block"])
def test_awq_rtn_beats_rtn_with_outlier_channels(tiny_model, scope):
    ids = _ids(16)
    err = {}
    for awq in (False, True):
        model = _with_outliers(tiny_model("llama", seed=4))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        tf = [make_config("transform", "awq", scope=scope)] if awq else []
        model, rep = quantize_model(model, None, quant_config("rtn", bits=3, group_size=16), calib_ids=ids,
                                    transforms=tf, progress=False)
        assert rep.check["on_grid"] and (len(rep.transforms) == 2) is awq
        if awq:  # the module whose output the search compares: the attention, the MLP, down itself; or the block
            want = {"attn_in": "self_attn", "mlp_in": "mlp", "mlp_out": "mlp.down_proj"} if scope == "module" else {}
            assert {g["group"]: g["scope"] for g in rep.transforms[0]["groups"]} == \
                {k: want.get(k, "block") for k in ("attn_in", "mlp_in", "mlp_out")}
        with torch.no_grad():
            err[awq] = float((model(input_ids=ids).logits - ref).norm() / ref.norm())
    assert err[True] < 0.8 * err[False], err


def test_awq_gptq_through_the_cli_saves_a_checkpoint_that_reloads_stock(tmp_path):
    ckpt = save_tiny("llama", tmp_path / "ckpt")
    d = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "compress", "model=hf", f"model.name={ckpt}", "quant=gptq",
                        "quant.group_size=16", "quant.symmetric=false", "transform=awq", "transform.grid=4",
                        "output.save_model=true", "calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64",
                        "eval.max_windows=2", f"hydra.run.dir={d}"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((d / "results.json").read_text())
    rep = data["quant_report"]
    assert [t["block"] for t in rep["transforms"]] == [0, 1] and rep["check"]["on_grid"]
    assert {g["group"] for g in rep["transforms"][0]["groups"]} == {"attn_in", "mlp_in", "mlp_out"}
    save = next(s for s in data["stages"] if s["name"] == "save")
    assert save["reload"]["ok"] and save["reload"]["weights_equal"] and "compressed-tensors" in save["format"]
    assert reload_check_cli(d, tmp_path)["ppl_rel_diff"] <= 1e-4


def test_awq_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="transform=awq runs inside the quant stage before a grid quantizer"):
        Config(quant=quant_config("bnb"), transform=make_config("transform", "awq"))
    with pytest.raises(ConfigError, match="transform.grid"):
        make_config("transform", "awq", grid=0)
    with pytest.raises(ConfigError, match="transform.scope"):
        make_config("transform", "awq", scope="layer")
    with pytest.raises(ConfigError, match="transform.bits is not a key of transform=awq"):
        make_config("transform", "awq", bits=4)
    Config(quant=quant_config("rtn"), transform=make_config("transform", "awq"))  # valid

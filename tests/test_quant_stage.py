"""The quant stage on tiny models: RTN, GPTQ and bitsandbytes on the in-memory (possibly pruned) model,
zeros and N:M kept, saved checkpoints that stock ``from_pretrained`` reloads in a process that never
imports compress, the stage order, the group-size check before loading, compare's dense baseline."""

import json
import subprocess
import sys

import pytest
import torch

from compress.calibration.targets import resolve_targets
from compress.core.modules import weight_matrix
from compress.config import Config, prune_config, quant_config
from compress.core.errors import ConfigError
from compress.schema import CalibConfig, EvalConfig, TrainConfig
from compress.core.masks import check_nm
from compress.stages.prune import prune_model
from compress.stages.quant import quantize_model

from .conftest import _tiny, byte_tokenizer, reload_check_cli, save_tiny

SMALL = ["calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2"]


def _ids(n=8, seqlen=32, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


@pytest.mark.parametrize("family", ["llama", "opt", "phi3"])
@pytest.mark.parametrize("method,act_order", [("rtn", False), ("gptq", False), ("gptq", True)])
def test_every_selected_linear_is_on_its_grid(tiny_model, family, method, act_order):
    model = tiny_model(family)
    ref = _logits(model, _ids(2))
    extra = {"act_order": act_order} if method == "gptq" else {}  # a key RTN does not have
    model, rep = quantize_model(model, None, quant_config(method=method, bits=4, group_size=32, **extra),
                                calib_ids=_ids(), progress=False)
    if method == "gptq":  # the output error of each module, measured against the weights before the stage
        assert all(m["rel_error"] > 0 for m in rep.modules)
    flat = resolve_targets(model).flat()
    assert len(rep.modules) == len(flat) and len(rep.params) == len(flat)
    for (name, mod), full in zip(flat.items(), resolve_targets(model).qualified_names()):
        w = weight_matrix(mod)
        scale, zero = rep.params[full]
        s = scale.repeat_interleave(32, 1)
        q = torch.round(w / s)
        assert torch.equal(q * s, w), name  # symmetric: w = q * scale exactly
        assert q.abs().max() <= 8
    assert rep.summary()["bits_per_weight_quantized"] == pytest.approx(4 + 32 / 32)
    rel = float((_logits(model, _ids(2)) - ref).norm() / ref.norm())
    assert 0 < rel < 0.5


def test_gptq_beats_rtn_on_a_tiny_model(tiny_model):
    ids = _ids(16, 32)
    out = {}
    for method in ("rtn", "gptq"):
        model = tiny_model("llama", seed=3)
        ref = _logits(model, ids)
        model, _ = quantize_model(model, None, quant_config(method=method, bits=3, group_size=32), calib_ids=ids,
                                  progress=False)
        out[method] = float((_logits(model, ids) - ref).norm() / ref.norm())
    assert out["gptq"] < out["rtn"]


@pytest.mark.parametrize("method", ["rtn", "gptq", "bnb4", "bnb8"])
def test_zeros_and_nm_survive_quantization(tiny_model, method):
    """SparseGPT 2:4, then each quantizer: every pruned weight still exactly zero and every group of 4 with at
    most 2 non-zeros, in the quantized weights (dequantized for bitsandbytes); the stage's own check agrees."""
    model = tiny_model("llama")
    prune_model(model, None, prune_config(method="sparsegpt", pattern="2:4", blocksize=32), calib_ids=_ids(),
                progress=False)
    zeros = {n: weight_matrix(m) == 0 for n, m in resolve_targets(model).flat().items()}
    cfg = (quant_config(method="bnb", bits=int(method[3])) if method.startswith("bnb")
           else quant_config(method=method, bits=4, group_size=32, symmetric=False))
    model, rep = quantize_model(model, None, cfg, calib_ids=_ids(), nm=(2, 4), progress=False)
    assert rep.check["ok"] and rep.check["nm_exact"] and rep.check["modules_with_zeros"] == len(zeros)
    if method.startswith("bnb"):
        from compress.core.modules import dense_weight

        names = resolve_targets(_tiny("llama")).qualified_names()
        weights = dict(zip(zeros, (dense_weight(model.get_submodule(n)) for n in names)))
    else:
        weights = {n: weight_matrix(m) for n, m in resolve_targets(model).flat().items()}
    for n, z in zeros.items():
        assert bool((weights[n][z] == 0).all()), n
        assert check_nm(weights[n], 2, 4), n


@pytest.mark.parametrize("bits,tol", [(8, 0.05), (4, 0.25)])
def test_bnb_forward_matches_fp32(tiny_model, bits, tol):
    import bitsandbytes as bnb

    model = tiny_model("llama", seed=2)
    ids = _ids(2)
    ref = _logits(model, ids)
    q, rep = quantize_model(model, None, quant_config(method="bnb", bits=bits), progress=False)
    kinds = {type(m) for m in q.modules() if isinstance(m, torch.nn.Linear)}
    assert (bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit) in kinds
    assert type(q.lm_head) is torch.nn.Linear  # only the selected (block) linears
    rel = float((_logits(q, ids) - ref).norm() / ref.norm())
    assert 0 < rel < tol


RELOAD = r"""
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
d, ids = sys.argv[1], json.loads(sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(d)
with torch.no_grad():
    logits = m(torch.tensor(ids), use_cache=False).logits.float()
out = {"logits": logits.contiguous()}
out.update({"w:" + n: p.detach().float().contiguous() for n, p in m.named_parameters() if "layers" in n})
save_file(out, sys.argv[3])
assert not any(k == "compress" or k.startswith("compress.") for k in sys.modules), "compress was imported"
"""


def _reload(d, ids, tmp_path):
    """Stock from_pretrained in a process that never imports compress: logits and block weights (safetensors)."""
    from safetensors.torch import load_file

    out = tmp_path / "reloaded.safetensors"
    p = subprocess.run([sys.executable, "-c", RELOAD, str(d), json.dumps(ids.tolist()), str(out)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    got = load_file(out)
    return {"logits": got["logits"], "weights": {k[2:]: v for k, v in got.items() if k.startswith("w:")}}


def _reload_check(run):
    """``compress reload-check RUN``: a process that imports only torch and transformers reloads the saved
    model and recomputes the weights' fingerprint, the zero counts and the run's perplexity."""
    return reload_check_cli(run, ok_codes=(0, 1))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4])
def test_compressed_tensors_save_and_stock_reload(tmp_path, symmetric, bits):
    """SparseGPT 50% + GPTQ through the experiment, saved as compressed-tensors pack-quantized: a process
    that imports only transformers and torch reloads it; weights equal the in-memory ones exactly, logits
    equal, zero counts identical (and recorded in the sidecar)."""
    from compress import experiment

    model = _tiny("llama", vocab=260)
    cfg = Config(prune=prune_config(method="sparsegpt", sparsity=0.5, blocksize=32),
                 quant=quant_config(method="gptq", bits=bits, group_size=32, symmetric=symmetric, blocksize=32),
                 calib=CalibConfig(nsamples=4, seqlen=32), eval=EvalConfig(seqlen=32, max_windows=2))
    cfg.output.save_model = True
    data = experiment.run_experiment(cfg, tmp_path / "run", model=model, tokenizer=byte_tokenizer(), print_summary=False)
    assert data["status"] == "ok" and [s["name"] for s in data["stages"]][:4] == ["load", "prune", "quant", "save"]
    assert data["stages"][3]["reload"]["ok"] and data["stages"][3]["reload"]["weights_equal"]  # verified at save
    d = tmp_path / "run" / "model"
    assert json.loads((d / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert not [p for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    ids = _ids(2, 16)
    got = _reload(d, ids, tmp_path)
    mine = {n: p.detach().float() for n, p in model.named_parameters() if "layers" in n}
    for n, w in mine.items():
        assert torch.equal(got["weights"][n], w), n
    assert torch.allclose(got["logits"], _logits(model, ids), atol=1e-5, rtol=0)
    side = json.loads((d / "compress_sparsity.json").read_text())
    assert side["zeros"] == sum(int((w == 0).sum()) for n, w in mine.items() if "proj" in n)
    assert data["metrics"]["quant_check"]["zeros_kept"] is True
    check = _reload_check(tmp_path / "run")
    assert check["ok"] and check["zeros"] == side["zeros"], check


@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_save_and_stock_reload(tmp_path, bits):
    from compress import experiment

    model = _tiny("llama", vocab=260)
    cfg = Config(quant=quant_config(method="bnb", bits=bits), eval=EvalConfig(seqlen=32, max_windows=2))
    cfg.output.save_model = True
    data = experiment.run_experiment(cfg, tmp_path / "run", model=model, tokenizer=byte_tokenizer(), print_summary=False)
    assert data["status"] == "ok"
    d = tmp_path / "run" / "model"
    assert json.loads((d / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    ids = _ids(2, 16)
    got = _reload(d, ids, tmp_path)
    assert data["metrics"]["ppl"]["wikitext2"] > 1
    assert torch.isfinite(got["logits"]).all()
    check = _reload_check(tmp_path / "run")  # weights as quantized, zero counts, the run's ppl within 1e-4
    assert check["weights_equal"] and check["zeros_equal"] and check["ppl_rel_diff"] <= 1e-4, check


def test_stage_order_is_configurable_and_validated():
    cfg = Config(prune=prune_config(method="wanda"), train=TrainConfig(method="lora"), quant=quant_config(method="gptq"),
                 stages=["train", "prune", "quant"])
    assert cfg.stages == ["train", "prune", "quant"]
    Config(prune=prune_config(method="wanda"), quant=quant_config(method="gptq"), stages=["prune", "quant", "train"])
    with pytest.raises(ConfigError, match="runs prune after quantizing"):
        Config(prune=prune_config(method="wanda"), quant=quant_config(method="gptq"), stages=["quant", "prune"])
    with pytest.raises(ConfigError, match="stages"):
        Config(stages=["prune", "prune"])
    with pytest.raises(ConfigError, match="stages"):
        Config(stages=["prune", "quantize"])
    with pytest.raises(ConfigError, match="leaves the quant stage out"):
        Config(quant=quant_config(method="rtn"), stages=["prune", "train"])
    with pytest.raises(ConfigError, match="runs train after quantizing"):
        Config(quant=quant_config(method="rtn"), train=TrainConfig(method="lora"), stages=["quant", "train"])


def test_group_size_that_does_not_divide_is_refused_before_the_model_loads(tmp_path):
    """Tiny Llama widths are 64 (q/k/v/o/gate/up inputs) and 128 (down): group 48 is refused at once,
    naming the modules and the sizes that would work, before any weight is read."""
    ckpt = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "compress", "model=hf", f"model.name={ckpt}", "quant=gptq",
                        "quant.group_size=48", *SMALL, f"hydra.run.dir={out}"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "quant.group_size=48" in p.stderr and "self_attn.q_proj (64)" in p.stderr and "[16, 32, 64]" in p.stderr
    assert not (out / "results.json").exists()  # nothing ran


def test_compare_does_not_take_a_quant_only_run_as_the_dense_baseline():
    from compress import compare

    proto = {"wikitext2": {"sha256": "ab", "seqlen": 512, "windows": 4, "bos": False}}

    def run(prune, quant, ppl):
        return {"status": "ok", "config": {"prune": {"method": prune}, "quant": {"method": quant, "bits": 4,
                                                                                  "group_size": 64, "symmetric": True}},
                "metrics": {"ppl": {"wikitext2": ppl}}, "protocol": proto, "stages": [], "_dir": f"{prune}-{quant}"}

    rows = compare.rows_from_runs([run("none", "gptq", 31.0), run("none", "none", 28.7), run("wanda", "none", 60.0)])
    dense = [r for r in rows if r["dense"]]
    assert len(dense) == 1 and dense[0]["ppl"] == 28.7
    gptq = [r for r in rows if r["quant"].startswith("gptq")][0]
    assert gptq["recipe"] == "gptq" and gptq["delta_vs_dense"] == pytest.approx(2.3)


def test_compare_plots_one_line_per_quant_setting(tmp_path):
    """A sweep over bits and group sizes: one series per setting across bit widths, sorted by bits per
    weight; runs with 8-bit activations are their own series (same weights, separate line), labelled W8A8;
    the dense run is the baseline line, not a point; the plot file is written."""
    from compress import compare

    proto = {"wikitext2": {"sha256": "ab", "seqlen": 512, "windows": 4, "bos": False}}

    def run(quant, bits, group, ppl, bpw):
        q = {"method": quant, "bits": bits, "group_size": group, "symmetric": True}
        return {"status": "ok", "config": {"prune": {"method": "none"}, "quant": q},
                "metrics": {"ppl": {"wikitext2": ppl}, "bits_per_weight": bpw}, "protocol": proto, "stages": [],
                "_dir": f"{quant}-{bits}-{group}"}

    runs = [run("rtn", b, g, 30 + 100 / b, b + (0.5 if g == 64 else 0.05)) for b in (8, 3, 4) for g in (64, -1)]
    runs.append({**run("none", 4, 64, 28.7, None), "config": {"prune": {"method": "none"}, "quant": {"method": "none"}}})
    a8 = run("rtn", 8, -1, 29.5, 8.05)
    a8["config"]["quant"].update(activations="int8", act_strategy="token", act_dynamic=True)
    a8["quant_report"] = {"summary": {"bits_label": "W8A8", "activations": "int8 token dynamic"}}
    rows = compare.rows_from_runs(runs + [a8])
    series, dense = compare.bits_series(rows)
    assert dense == 28.7 and sorted(series) == ["[A16] rtn ch sym", "[A16] rtn g64 sym",
                                                "[A8 int8] rtn ch sym a:int8 token dynamic"]
    assert [w for _, _, w in series["[A16] rtn g64 sym"]] == [3, 4, 8]
    assert {r["bits"] for r in rows if r["quant"] != "-"} == {"W3A16", "W4A16", "W8A16", "W8A8"}
    assert "| W8A8 |" in compare.markdown_table(rows)
    assert compare.plot_bits(rows, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("pattern,act_order", [("unstructured", True), ("2:4", False), ("2:4", True)])
def test_joint_one_pass_mask_and_grid_exact_after_reload(tmp_path, pattern, act_order):
    """quant=sparsegpt_gptq: the mask is chosen and the kept weights quantized in one column loop; every module
    reaches its sparsity (N:M exact), every weight lies on its grid, and the saved checkpoint reloads with stock
    transformers to the same weights."""
    from compress import experiment

    model = _tiny("llama", vocab=260)
    cfg = Config(quant=quant_config(method="sparsegpt_gptq", sparsity=0.5, pattern=pattern, bits=4, group_size=32,
                                    act_order=act_order, blocksize=32),
                 calib=CalibConfig(nsamples=4, seqlen=32), eval=EvalConfig(seqlen=32, max_windows=2))
    cfg.output.save_model = True
    data = experiment.run_experiment(cfg, tmp_path / "run", model=model, tokenizer=byte_tokenizer(), print_summary=False)
    assert data["status"] == "ok"
    rep = data["quant_report"]
    assert rep["check"]["on_grid"] is True and rep["check"]["sparsity"]["ok"] is True
    n_lin = len(resolve_targets(model).flat())
    assert len(rep["modules"]) == n_lin and all(m["achieved"] >= 0.5 - 1 / m["cols"] for m in rep["modules"])
    assert data["metrics"]["sparsity"] >= 0.5 - 1e-3  # kept weights that round to 0 on the grid add a few zeros
    got = _reload(tmp_path / "run" / "model", _ids(2, 16), tmp_path)
    for n, w in model.named_parameters():
        if "proj" not in n:
            continue
        w = w.detach().float()
        assert torch.equal(got["weights"][n], w), n
        assert float((w == 0).float().mean()) >= 0.5 - 1e-9, n
        if pattern == "2:4":
            assert check_nm(got["weights"][n], 2, 4), n
    assert rep["check"]["nm_exact"] is (True if pattern == "2:4" else None)
    check = _reload_check(tmp_path / "run")
    assert check["ok"] and check["weights_equal"] and check["zeros_equal"] and check["ppl_rel_diff"] <= 1e-4, check


def _retyped(method):
    """A joint config whose method key says another quantizer (what a hand-edited config.yaml could hold)."""
    cfg = quant_config(method="sparsegpt_gptq")
    cfg.method = method
    return cfg


def test_joint_method_is_checked_where_it_cannot_apply():
    """The joint method is its own quantizer: with a prune stage before it, or keys of another method, it
    is refused by name; its N:M groups must fit in its quant groups."""
    with pytest.raises(ConfigError, match="quant.joint is not a key of quant=gptq"):
        quant_config(method="gptq", joint=True)
    with pytest.raises(ConfigError, match="off their grid"):
        quant_config(method="sparsegpt_gptq", reconstruct_epochs=1, sequential="true")
    with pytest.raises(ConfigError, match="would discard prune=wanda's zeros"):
        Config(prune=prune_config(method="wanda"), quant=quant_config(method="sparsegpt_gptq"))
    with pytest.raises(ConfigError, match="quant.method='gptq' does not match"):
        Config(quant=_retyped("gptq"))
    with pytest.raises(ConfigError, match="group_size to be a multiple of 8"):
        quant_config(method="sparsegpt_gptq", pattern="4:8", group_size=4)
    with pytest.raises(ConfigError, match="runs train after quantizing"):
        Config(quant=quant_config(method="sparsegpt_gptq"), train=TrainConfig(method="lora"),
               stages=["quant", "train"])
    Config(quant=quant_config(method="sparsegpt_gptq", pattern="2:4"))  # valid


def test_a_checkpoint_that_does_not_reload_is_never_ok(tmp_path):
    """Falcon's own _init_weights touches ``.weight`` of every FalconLinear, which compressed-tensors packed:
    stock from_pretrained cannot load the GPTQ checkpoint. The save step's fresh-process reload finds it: the
    run ends non-zero naming the cause and the working alternative (the evaluation still runs and is
    recorded), the unloadable checkpoint is moved aside; with output.save_fallback=true the dequantized
    weights are saved instead, recorded as such, and reload with stock from_pretrained to equal weights."""
    import transformers as T

    torch.manual_seed(0)
    ckpt = tmp_path / "falcon"
    T.AutoModelForCausalLM.from_config(T.FalconConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4)).save_pretrained(ckpt)
    byte_tokenizer().save_pretrained(ckpt)
    args = ["model=hf", f"model.name={ckpt}", "quant=gptq", "quant.group_size=16", "output.save_model=true", *SMALL]
    d = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "compress", *args, f"hydra.run.dir={d}"], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "does not reload" in p.stderr and "FalconLinear" in p.stderr and "output.save_fallback=true" in p.stderr
    data = json.loads((d / "results.json").read_text())
    save = next(s for s in data["stages"] if s["name"] == "save")
    assert data["status"] == "failed" and save["status"] == "failed" and "FalconLinear" in save["error"]
    assert data["metrics"]["ppl"]["wikitext2"] > 1  # the evaluation ran and was recorded
    assert not (d / "model").exists() and (d / "model.does-not-reload").exists()
    d2 = tmp_path / "run_fallback"
    p = subprocess.run([sys.executable, "-m", "compress", *args, "output.save_fallback=true", f"hydra.run.dir={d2}"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((d2 / "results.json").read_text())
    save = next(s for s in data["stages"] if s["name"] == "save")
    assert data["status"] == "ok" and "FalconLinear" in save["fallback_from"]["error"]
    assert save["reload"]["ok"] and save["reload"]["weights_equal"] and "dequantized" in save["format"]
    assert json.loads((d2 / "model" / "compress_quantization.json").read_text())["bits"] == 4
    check = _reload_check(d2)
    assert check["ok"] and check["weights_equal"] and check["ppl_rel_diff"] <= 1e-4, check


def test_joint_method_takes_a_sparsity_schedule(tiny_model, calib_ids):
    """OWL's per-block sparsity for the joint method, as for a prune stage: blocks get different targets, each
    reached, the mean at the target, every weight on its grid."""
    model = tiny_model("qwen2")
    cfg = quant_config(method="sparsegpt_gptq", sparsity=0.5, schedule="owl", owl_lambda=0.1, owl_m=3, bits=4,
                       group_size=32, blocksize=32)
    model, rep = quantize_model(model, None, cfg, calib_ids=calib_ids, progress=False)
    assert rep.layer_sparsities is not None and len(set(rep.layer_sparsities)) == 2
    assert sum(rep.layer_sparsities) / 2 == pytest.approx(0.5, abs=1e-6)
    assert rep.check["ok"] and rep.check["sparsity"]["ok"] and rep.check["on_grid"]


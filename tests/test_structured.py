"""Structured pruning on tiny random models: a GQA family with q/k/v biases (Qwen2; Llama with all biases on),
and a non-GQA family with biases (OPT). Physical removal equals masking, GQA groups stay consistent, the
result reloads with stock from_pretrained, the LoRA gradient estimate is what autograd says, depth pruning
keeps generation with a KV cache working, and an architecture the role map lacks is refused by name."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as T

from compress.calibration.blocks import find_blocks
from compress.config import ConfigError, prune_config
from compress.core.errors import UnsupportedModelError
from compress.calibration.roles import block_structure
from compress.registry import get
from compress.reload import STOCK
from compress.structured.scoring import ImportanceContext, attn_scores
from compress.structured.surgery import (Keep, block_params, count_params, masked_logits, plan_widths, remove_blocks,
                                         remove_width, select)

from .conftest import VOCAB, _tiny, byte_tokenizer, reload_check_cli, save_tiny


def _model(family):
    if family == "llama_bias":  # GQA with every bias on (attention_bias, mlp_bias)
        base = _tiny("llama").config.to_dict()
        torch.manual_seed(1)
        cfg = T.LlamaConfig(**dict(base, attention_bias=True, mlp_bias=True))
        return T.AutoModelForCausalLM.from_config(cfg).eval()
    m = _tiny(family)
    if family == "qwen2":
        assert m.model.layers[0].self_attn.q_proj.bias is not None  # q/k/v biases
    if family == "opt":
        assert m.model.decoder.layers[0].fc1.bias is not None
    return m


def _ids(n=2, t=24, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _importance(name, model, st, cfg=None, **kw):
    """An importance's scores through the registry (what the structured stage calls)."""
    cfg = cfg or prune_config(method="structured", importance=name)
    return get("importance", name).impl()(ImportanceContext(model, st, cfg, progress=False, **kw)).scores


def _magnitude_keeps(model, ratio, unit):
    st = block_structure(model)
    plan = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), ratio, unit)
    scores = _importance("magnitude", model, st)
    if unit != "none":
        for b, s in zip(st.blocks, scores):
            s["attn"] = attn_scores(b, s, unit)
    return st, plan, select(st, plan, scores)


CASES = [("qwen2", "kv_group"), ("qwen2", "query_head"), ("llama_bias", "kv_group"), ("llama_bias", "query_head"),
         ("opt", "none")]


@pytest.mark.parametrize("family,unit", CASES)
def test_physical_removal_equals_masking(family, unit):
    model = _model(family)
    ids = _ids()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    st, plan, keeps = _magnitude_keeps(model, 0.3, unit)
    masked = masked_logits(model, st, keeps, ids)
    assert (masked - dense).abs().max() > 1e-3  # the masks do something
    before = count_params(model)
    sizes = remove_width(model, st, keeps)
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=0)
    after = count_params(model)
    assert before["params_blocks"] - after["params_blocks"] == plan.removed_params * len(st.blocks)
    b = block_structure(model).blocks[0]  # re-read from the shrunk model
    assert b.intermediate == plan.channels - plan.channel_remove and b.intermediate % 8 == 0
    if unit == "kv_group":
        assert (b.n_kv, b.n_heads) == (1, 2) and sizes["num_key_value_heads"] == 1
    elif unit == "query_head":
        assert (b.n_kv, b.n_heads) == (2, 2)
    assert b.modules["q"].weight.shape[0] == b.n_heads * b.head_dim
    if b.modules["q"].bias is not None:
        assert b.modules["q"].bias.shape[0] == b.n_heads * b.head_dim
        assert b.modules["k"].bias.shape[0] == b.n_kv * b.head_dim


def test_gqa_groups_stay_consistent():
    model = _model("qwen2")  # 4 query heads, 2 KV heads: heads 0,1 read KV 0; heads 2,3 read KV 1
    st = block_structure(model)
    n = len(st.blocks)
    s = [{"heads": torch.tensor([4.0, 3.0, 2.0, 1.0]), "kv": torch.tensor([0.0, 0.0]),
          "channels": torch.arange(128.0)} for _ in range(n)]
    plan = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), 0.3, "kv_group")
    for b, x in zip(st.blocks, s):
        x["attn"] = attn_scores(b, x, "kv_group")
    k = select(st, plan, s)[0]
    assert k.kv_heads == [0] and k.q_heads == [0, 1]  # the weaker group goes whole, with both its heads
    plan_q = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), 0.3, "query_head")
    for b, x in zip(st.blocks, s):
        x["attn"] = attn_scores(b, x, "query_head")
    k = select(st, plan_q, s)[0]
    assert k.kv_heads == [0, 1] and k.q_heads == [0, 2]  # one head dropped inside every group
    # the surgery refuses keep sets that would break the GQA mapping
    bad = [Keep([0, 3], [0], list(range(128)))] * n  # head 3 reads KV 1, which is removed
    with pytest.raises(ValueError, match="reads KV head 1"):
        remove_width(_model("qwen2"), block_structure(_model("qwen2")), bad)
    uneven = [Keep([0, 1, 2], [0, 1], list(range(128)))] * n
    with pytest.raises(ValueError, match="split into|unequal"):
        remove_width(_model("qwen2"), block_structure(_model("qwen2")), uneven)


def test_save_and_stock_reload_round_trip(tmp_path):
    model = _model("qwen2")
    st, plan, keeps = _magnitude_keeps(model, 0.3, "kv_group")
    remove_width(model, st, keeps)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    torch.save({"ids": ids, "ref": ref}, tmp_path / "check.pt")  # read back only by the child below
    child = (
        "import sys, torch, transformers as T\n"
        f"d = {str(tmp_path)!r}\n"
        "m = T.AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "c = torch.load(d + '/check.pt')\n"
        "with torch.no_grad(): out = m(input_ids=c['ids']).logits\n"
        "assert 'compress' not in sys.modules\n"
        "print(float((out - c['ref']).abs().max()), m.config.num_attention_heads, m.config.num_key_value_heads, "
        "m.config.intermediate_size, m.config.head_dim)\n")
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    diff, nh, nkv, inter, hd = r.stdout.split()[-5:]
    assert float(diff) <= 1e-5
    assert (int(nh), int(nkv), int(inter), int(hd)) == (2, 1, plan.channels - plan.channel_remove, 16)
    assert not list(tmp_path.glob("*.bin")) and list(tmp_path.glob("*.safetensors"))


def test_lora_gradient_estimate_matches_autograd():
    """Ĝ = s(G_B A + B G_A - G_B G_A) is minus the change of the merged weight under one unit-rate SGD step
    on the factors, and its first-order part is the true gradient projected on the LoRA subspaces."""
    from peft import LoraConfig, get_peft_model

    from compress.structured.lora import lora_grad_estimate, lora_weight_scores

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10))
    peft = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    layer = peft.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.normal_()  # B starts at zero in LoRA; a non-zero B exercises every term
    s = layer.scaling["default"]
    x, y = torch.randn(7, 12), torch.randn(7, 10)
    loss = ((peft(x) - y) ** 2).sum()
    loss.backward()
    W = layer.base_layer.weight.detach()
    est = lora_grad_estimate(A.detach(), B.detach(), A.grad, B.grad, s)
    merged = W + s * B.detach() @ A.detach()
    stepped = W + s * (B.detach() - B.grad) @ (A.detach() - A.grad)
    torch.testing.assert_close(est, -(stepped - merged), atol=1e-5, rtol=1e-5)
    # autograd's dL/dW of the merged weight, projected: s(G_B A + B G_A) = s^2 (G A^T A + B B^T G)
    Wm = merged.clone().requires_grad_(True)
    bias = layer.base_layer.bias.detach()
    (((x @ Wm.t() + bias) - y) ** 2).sum().backward()
    G = Wm.grad
    first = s * (B.grad @ A.detach() + B.detach() @ A.grad)
    torch.testing.assert_close(first, s * s * (G @ A.detach().t() @ A.detach() + B.detach() @ B.detach().t() @ G),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lora_weight_scores(layer), (merged * est) ** 2)
    torch.testing.assert_close(lora_weight_scores(layer, score="element_abs"), (merged * est).abs())
    torch.testing.assert_close(lora_weight_scores(layer, score="group_sq"), merged * est)


def test_group_scores_square_signed_group_sums():
    """``group_sq``: the signed sum over each group is squared before the per-module normalisation, so
    opposite signs inside a group cancel (unlike the element-wise scores)."""
    from compress.structured.scoring import group_scores

    st = block_structure(_model("llama"))
    b = st.blocks[0]
    S = {"up": torch.zeros(b.intermediate, b.modules["up"].in_features)}
    S["up"][0, :2] = torch.tensor([1.0, -1.0])  # channel 0: cancels
    S["up"][1, 0] = -2.0  # channel 1: one negative weight score
    S["up"][2, 0] = 1.0
    sq = group_scores(b, S, post=torch.square)["channels"]
    assert sq[0] == 0 and sq[1] == pytest.approx(0.8) and sq[2] == pytest.approx(0.2)
    plain = group_scores(b, {"up": S["up"].abs()})["channels"]
    assert plain[0] == pytest.approx(2 / 5) and plain[1] == pytest.approx(2 / 5)


def test_lora_estimator_masks_on_schedule_and_removal_equals_masking():
    from compress.config import TrainConfig
    from compress.structured.lora import LoraPruneCallback, cubic_fraction
    from compress.training import Trainer

    assert cubic_fraction(2, 10, 0.2, 0.2) == 0.0 and cubic_fraction(8, 10, 0.2, 0.2) == 1.0
    assert 0 < cubic_fraction(4, 10, 0.2, 0.2) < cubic_fraction(6, 10, 0.2, 0.2) < 1
    model = _model("qwen2")
    st = block_structure(model)
    plan = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), 0.3, "kv_group")
    cb = LoraPruneCallback(st, plan, total_steps=8, warmup=0.25, cooldown=0.25, round_to=8)
    cfg = TrainConfig(method="lora", max_steps=8, micro_batch_size=2, seqlen=16, lr=1e-3, lora_r=4, log_every=4,
                      eval_before=False)
    ids = torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(model, cfg, ids, masks={}, callbacks=[cb])
    fracs = []
    orig = cb.prune_to
    cb.prune_to = lambda f, step=-1: (fracs.append(f), orig(f, step))
    ids_eval = _ids()
    # the masked peft model's logits, just before the merge
    merged = trainer.fit()
    cb.detach()
    assert fracs[:2] == [0.0, 0.0] and fracs[-1] == 1.0 and sorted(fracs) == fracs
    keeps = cb.keeps()
    for b, k in zip(st.blocks, keeps):
        assert len(k.kv_heads) == b.n_kv - plan.attn_remove
        assert len(k.channels) == b.intermediate - plan.channel_remove
    masked = masked_logits(merged, st, keeps, ids_eval)
    remove_width(merged, st, keeps)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids_eval).logits, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["magnitude", "activation", "taylor"])
def test_estimators_score_every_group(name):
    model = _model("llama_bias")
    st = block_structure(model)
    w0 = {n: p.clone() for n, p in model.named_parameters()}
    scores = _importance(name, model, st, calib_ids=_ids(4, 32), batch_size=2)
    assert len(scores) == len(st.blocks)
    for b, s in zip(st.blocks, scores):
        assert s["heads"].shape == (b.n_heads,) and s["channels"].shape == (b.intermediate,)
        assert torch.isfinite(s["channels"]).all() and s["channels"].sum() > 0 and s["heads"].sum() > 0
    assert all(torch.equal(p, w0[n]) and p.grad is None for n, p in model.named_parameters())  # scoring changes nothing


def test_depth_pruning_keeps_kv_cache_generation_working():
    model = _tiny("qwen2_sliding")  # 4 blocks, layer_types full, full, sliding, sliding
    scores = _importance("block", model, None, calib_ids=_ids(2, 32))
    assert scores.shape == (4,) and (scores > 0).all()
    info = remove_blocks(model, [1])
    assert info["num_hidden_layers"] == 3 and "layer_types" in info["trimmed_config_lists"]
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert [blk.self_attn.layer_idx for blk in model.model.layers] == [0, 1, 2]
    prompt = _ids(1, 12)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=True)
        # the same greedy tokens without a cache: one full forward per new token
        seq = prompt
        for _ in range(16):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert cached.shape == (1, 28) and torch.equal(cached, seq)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_unmapped_architecture_is_refused_by_name(family):
    """Conv1D blocks (GPT-2's c_attn) and interleaved fused projections (GPT-NeoX's query_key_value) match no
    role pattern: refused, naming the model type, what was tried and what the block holds."""
    with pytest.raises(UnsupportedModelError, match="match no known role pattern") as e:
        block_structure(_tiny(family))
    assert f"model_type={family!r}" in str(e.value) and "llama-style" in str(e.value)


def test_opt_heads_are_refused_but_channels_work():
    model = _model("opt")
    st, plan, keeps = _magnitude_keeps(model, 0.3, "kv_group")
    with pytest.raises(ValueError, match="head_dim"):
        remove_width(model, st, keeps)


def test_plan_reaches_the_ratio_with_round_to():
    model = _model("qwen2")
    st = block_structure(model)
    total = block_params(find_blocks(model)[1][0])
    for ratio in (0.2, 0.5):
        p = plan_widths(st.blocks[0], total, ratio, "kv_group", round_to=8)
        assert abs(p.ratio - ratio) < 0.05 and (p.channels - p.channel_remove) % 8 == 0


def test_structured_config_is_checked():
    with pytest.raises(ConfigError, match="prune.importance.*Valid choices: activation, block, lora, magnitude, taylor"):
        prune_config(method="structured", importance="l1")
    with pytest.raises(ConfigError, match="prune.ratio"):
        prune_config(method="structured", ratio=1.2)
    with pytest.raises(ConfigError, match="protect_first"):
        prune_config(method="structured", importance="magnitude", protect_first=2)
    prune_config(method="structured", importance="block", protect_first=2)
    prune_config(method="structured", importance="magnitude", protect_first=2, uniform=False)
    with pytest.raises(ConfigError, match="uniform=false"):
        prune_config(method="structured", importance="lora", uniform=False)
    with pytest.raises(ConfigError, match="prune.lora_score.*element_sq, element_abs, group_sq"):
        prune_config(method="structured", importance="lora", lora_score="taylor")


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd)


def _reload_check(run, cwd):
    """``compress reload-check RUN`` in a fresh process: ok, weights equal, the run's ppl and probe logits."""
    check = reload_check_cli(run, cwd)
    assert check["ok"] and check["weights_equal"] and check["ppl_rel_diff"] <= 1e-4, check
    assert check["probe_logits_max_abs_diff"] <= 1e-5, check
    return check


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


SMALL = ["calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2"]


def test_cli_structured_run_records_and_reloads(tmp_path):
    torch.manual_seed(0)
    ckpt = _save(T.AutoModelForCausalLM.from_config(T.Qwen2Config(
        vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256)), tmp_path / "ckpt")
    d = tmp_path / "run"
    r = _cli(["model=hf", f"model.name={ckpt}", "prune=structured", "prune.importance=activation", "prune.ratio=0.3", "prune.attn_fraction=0.5",
              "output.save_model=true", "eval.speed=true", "eval.speed_seqlen=64", *SMALL, f"hydra.run.dir={d}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((d / "results.json").read_text())
    st = data["structured"]
    assert data["status"] == "ok" and st["achieved_ratio"] >= 0.3 - 0.015
    assert st["params_after"]["params_blocks"] < st["params_before"]["params_blocks"]
    assert data["metrics"]["params_total"] == st["params_after"]["params_total"]
    sp = data["metrics"]["speed"]
    assert sp["flop_ratio_ceiling"] > 1 and set(sp["speedup"]) == {"prefill_b1", "prefill_b8", "decode_b1"}
    cfg = json.loads((d / "model" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 1 and cfg["intermediate_size"] == st["config_sizes"]["intermediate_size"]
    m = T.AutoModelForCausalLM.from_pretrained(d / "model")
    assert count_params(m)["params_total"] == st["params_after"]["params_total"]
    _reload_check(d, tmp_path)
    # non-uniform widths through the CLI: the first block protected, per-layer widths saved, the small loader
    d2 = tmp_path / "run_nonuniform"
    r = _cli(["model=hf", f"model.name={ckpt}", "prune=structured", "prune.importance=taylor", "prune.ratio=0.3",
              "prune.uniform=false", "prune.protect_first=1", "output.save_model=true", *SMALL,
              f"hydra.run.dir={d2}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    st2 = json.loads((d2 / "results.json").read_text())["structured"]
    assert st2["channels_removed_per_block"][0] == 0 and st2["achieved_ratio"] >= 0.3 - 0.015
    from compress.structured.surgery import load_pruned

    m2 = load_pruned(d2 / "model")
    assert m2.model.layers[0].mlp.down_proj.in_features == 128 > m2.model.layers[1].mlp.down_proj.in_features
    assert count_params(m2)["params_total"] == st2["params_after"]["params_total"]
    assert _reload_check(d2, tmp_path)["loader"] != STOCK
    # an architecture outside the role map is refused before the model loads, naming it
    gpt2 = tmp_path / "gpt2"
    T.GPT2Config(vocab_size=260, n_embd=64, n_layer=2, n_head=4).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    r = _cli(["model=hf", f"model.name={gpt2}", "prune=structured", *SMALL, f"hydra.run.dir={tmp_path / 'g'}"], tmp_path)
    assert r.returncode != 0 and "role pattern" in r.stderr and "gpt2" in r.stderr
    assert "nothing was recorded" in r.stderr and not (tmp_path / "g" / "results.json").exists()  # refused before any work


@pytest.mark.parametrize("base", ["fp", "4bit"])
def test_lora_importance_stage_merges_into_full_precision_weights(base, tmp_path):
    """The stage's LoRA estimator on a fp base and on a bitsandbytes 4-bit base (QLoRA; the full-precision
    weights wait on disk meanwhile and the adapters are merged into them): the plan's groups are removed
    and the pruned model equals the merged model under the masks."""
    from compress.schema import TrainConfig

    model = _model("qwen2")
    w_before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    st = block_structure(model)
    plan = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), 0.3, "kv_group", None)
    cfg = prune_config(method="structured", importance="lora", ratio=0.3, lora_steps=6, lora_base=base,
                       attn_fraction=None, lora_r=8 if base == "fp" else None)
    train = TrainConfig(micro_batch_size=2, seqlen=16, lr=1e-2, lora_r=4, log_every=2, source="wikitext2")
    tok = byte_tokenizer()
    model.resize_token_embeddings(len(tok)) if len(tok) > VOCAB else None
    res = get("importance", "lora").impl()(ImportanceContext(model, st, cfg, plan=plan, tokenizer=tok, train_cfg=train,
                                                            out_dir=tmp_path, progress=False))
    keeps, merged, info = res.keeps, res.model, res.info
    assert info["lora"]["steps"] == 6 and info["lora"]["base"] == base
    assert info["lora"]["lora_r"] == (8 if base == "fp" else 4)  # prune.lora_r, else train.lora_r
    lora_a = merged.model.layers[0].mlp.up_proj  # merged: plain linears again (no adapter left)
    assert not hasattr(lora_a, "lora_A")
    w_after = merged.model.layers[0].mlp.down_proj.weight
    assert w_after.dtype == torch.float32 and w_after.shape == w_before.shape
    assert not torch.equal(w_after, w_before)  # the adapters were merged into the full-precision weights
    for b, k in zip(st.blocks, keeps):
        assert len(k.kv_heads) == b.n_kv - plan.attn_remove and len(k.channels) == b.intermediate - plan.channel_remove
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    masked = masked_logits(merged, block_structure(merged), keeps, ids)
    remove_width(merged, block_structure(merged), keeps)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, masked, atol=1e-5, rtol=0)


def test_structured_sweep_then_compare(tmp_path):
    """The issue's sweep form on a tiny checkpoint, then `compress compare`: structured rows show what was
    removed, params, FLOPs/token and measured speed beside an unstructured row."""
    torch.manual_seed(0)
    ckpt = _save(T.AutoModelForCausalLM.from_config(T.LlamaConfig(
        vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256)), tmp_path / "ckpt")
    d = tmp_path / "sweep"
    common = ["model=hf", f"model.name={ckpt}", *SMALL, "eval.speed=true", "eval.speed_seqlen=32"]
    r = _cli(["-m", "prune=structured", "prune.importance=magnitude,activation", "prune.ratio=0.2,0.4", *common,
              f"hydra.sweep.dir={d}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(["prune=wanda", "prune.sparsity=0.5", *common, f"hydra.run.dir={tmp_path / 'wanda'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = _cli(["compare", str(d), str(tmp_path / "wanda")], tmp_path)
    assert c.returncode == 0, c.stderr[-2000:]
    table = c.stdout
    assert "removed (structured)" in table and "MFLOPs/token" in table and "prefill × dense" in table
    rows = [ln for ln in table.splitlines() if "| structured |" in ln]
    assert len(rows) == 4 and all("x |" in ln for ln in rows)  # ceiling and measured ratios filled in
    assert any("| wanda |" in ln for ln in table.splitlines())
    # FLOPs/token for every row: the dense and the unstructured row alike (same shapes, zeros multiplied),
    # each structured row below them
    head = [c.strip() for c in next(ln for ln in table.splitlines() if "MFLOPs/token" in ln).strip("|").split("|")]
    col = head.index("MFLOPs/token")

    def mflops(ln):
        return float(ln.strip().strip("|").split("|")[col])

    dense_row = next(ln for ln in table.splitlines() if ln.startswith("| dense |"))
    wanda_row = next(ln for ln in table.splitlines() if "| wanda |" in ln)
    assert mflops(dense_row) == mflops(wanda_row) > 0
    assert all(mflops(ln) < mflops(dense_row) for ln in rows)
    runs = [json.loads(p.read_text()) for p in d.glob("*/results.json")]
    ratios = sorted(round(x["structured"]["achieved_ratio"], 1) for x in runs if "structured" in x)
    assert ratios == [0.2, 0.2, 0.4, 0.4]


def test_structured_then_gptq_needs_widths_divisible_by_the_group():
    from compress.config import Config, quant_config

    with pytest.raises(ConfigError, match="prune.round_to=8 with quant.group_size=64"):
        Config(prune=prune_config(method="structured"), quant=quant_config(method="gptq", group_size=64))
    Config(prune=prune_config(method="structured", round_to=64), quant=quant_config(method="gptq", group_size=64))


def test_flap_bias_compensation_reduces_error_and_reloads(tmp_path):
    """FLAP's baseline on a Llama without biases: the removed inputs' mean contribution goes into new o/down
    biases (the family's switches turned on, the other biases written as zeros). The output error on the
    calibration tokens drops against plain removal, and the result reloads with stock from_pretrained."""
    import copy

    from compress.structured.surgery import add_output_bias, bias_compensation

    base = _tiny("llama")  # GQA, no biases
    ids = _ids(8, 32, seed=5)
    with torch.no_grad():
        dense = base(input_ids=ids).logits
    errs = {}
    for comp in (False, True):
        model = copy.deepcopy(base)
        st = block_structure(model)
        res = get("importance", "activation").impl()(ImportanceContext(
            model, st, prune_config(method="structured", importance="activation"), calib_ids=ids, batch_size=4,
            progress=False))
        scores = res.scores
        plan = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), 0.4, "query_head", 0.5)
        for b, s in zip(st.blocks, scores):
            s["attn"] = attn_scores(b, s, "query_head")
        keeps = select(st, plan, scores)
        comps = bias_compensation(st, keeps, res.means) if comp else None
        remove_width(model, st, keeps)
        if comp:
            info = add_output_bias(model, st, comps)
            assert info["config_switched_on"] == ["attention_bias", "mlp_bias"]
            assert model.config.attention_bias and model.config.mlp_bias
        with torch.no_grad():
            out = model(input_ids=ids).logits
        errs[comp] = float((out - dense).square().mean())
        if comp:
            model.save_pretrained(tmp_path, safe_serialization=True)
            re = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
            with torch.no_grad():
                torch.testing.assert_close(re(input_ids=ids).logits, out, atol=1e-5, rtol=0)
            assert re.model.layers[0].mlp.gate_proj.bias.abs().max() == 0  # the switch's other biases are zeros
            assert re.model.layers[0].mlp.down_proj.bias.abs().max() > 0
    assert errs[True] < errs[False]


def test_non_uniform_widths_reload_with_the_small_loader(tmp_path):
    """uniform=false: one global ranking of MLP channels, protected blocks untouched, per-layer widths in the
    config; stock from_pretrained refuses the checkpoint (size mismatch, nothing re-initialised) and
    compress.structured.load_pruned reloads it with the in-memory model's logits."""
    from compress.structured.surgery import load_pruned
    from compress.structured.surgery import channel_counts

    model = _tiny("qwen2_sliding")  # 4 blocks
    st = block_structure(model)
    plan = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), 0.3, "kv_group", 0.0)
    scores = _importance("magnitude", model, st)
    for i, s in enumerate(scores):  # make the blocks differ clearly
        s["channels"] = s["channels"] * (i + 1)
    counts = channel_counts(st, plan, scores, uniform=False, protect=[0], round_to=8)
    assert counts[0] == 0 and len(set(counts[1:])) > 1
    assert abs(sum(counts) - plan.channel_remove * 4) <= 8 * 4  # the same total, up to rounding
    keeps = select(st, plan, scores, counts)
    with pytest.raises(ValueError, match="non-uniform"):
        remove_width(copy_model(model), block_structure(copy_model(model)), keeps)
    sizes = remove_width(model, st, keeps, uniform=False)
    assert [w["intermediate_size"] for w in sizes["per_layer"]] == [128 - c for c in counts]
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # it refuses; nothing re-initialised
        T.AutoModelForCausalLM.from_pretrained(tmp_path)
    re = load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(re(input_ids=ids).logits, ref, atol=1e-5, rtol=0)
    assert [blk.mlp.down_proj.in_features for blk in re.model.layers] == [128 - c for c in counts]


def copy_model(m):
    import copy

    return copy.deepcopy(m)


def test_protected_blocks_keep_their_attention():
    model = _model("qwen2")
    st, plan, _ = _magnitude_keeps(model, 0.3, "kv_group")
    scores = _importance("magnitude", model, st)
    for b, s in zip(st.blocks, scores):
        s["attn"] = attn_scores(b, s, "kv_group")
    keeps = select(st, plan, scores, [0, plan.channel_remove], protect=[0])
    assert keeps[0].kv_heads == [0, 1] and len(keeps[0].q_heads) == 4 and len(keeps[0].channels) == 128
    assert len(keeps[1].kv_heads) == 1 and len(keeps[1].channels) == 128 - plan.channel_remove


def test_flops_count_shapes_not_storage(tmp_path):
    """FLOPs/token come from the linears' shapes: a bitsandbytes 4-bit model (packed storage) counts as
    the float model it was loaded from, and a structurally pruned one counts less."""
    from compress.evaluate import flops_per_token

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.LlamaConfig(
        vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128))
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    q = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=T.BitsAndBytesConfig(
        load_in_4bit=True))
    assert type(q.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    f, g = flops_per_token(model, 32), flops_per_token(q, 32)
    assert f["total"] == g["total"] and f["attention_counted"]
    st = block_structure(model)
    remove_width(model, st, [Keep(list(range(4)), list(range(2)), list(range(64))) for _ in st.blocks])
    assert flops_per_token(model, 32)["linear"] < f["linear"]


@pytest.mark.parametrize("family,unit", [("gemma3", "kv_group"), ("gemma3", "query_head"), ("phi3", "none")])
def test_roles_recognised_by_structure_removal_equals_masking(family, unit):
    """Gemma-3 (model_type gemma3_text, per-head q/k norms, sliding and full layers) and Phi-3 (fused qkv_proj
    and gate_up_proj, declared by split sizes) are recognised from their modules and shapes, without being
    listed anywhere; removing heads / channels for real gives the masked model's logits."""
    model = _tiny(family)
    st = block_structure(model)
    assert st.pattern.name.startswith("fused" if family == "phi3" else "llama")
    if family == "phi3":
        assert st.blocks[0].fused("q") and st.blocks[0].parts["v"] == (96, 128)  # 4 x 16 q rows, 2 x 16 k, 2 x 16 v
    ids = _ids()
    st, plan, keeps = _magnitude_keeps(model, 0.3, unit)
    masked = masked_logits(model, st, keeps, ids)
    remove_width(model, st, keeps)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked, atol=1e-5, rtol=0)
    b = block_structure(model).blocks[0]
    assert b.intermediate == plan.channels - plan.channel_remove and (unit == "none" or b.n_heads < st.blocks[0].n_heads)


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_cli_structured_on_recognised_families_reaches_the_target_and_reloads_stock(family, tmp_path):
    """The issue's command on tiny Gemma-3 and Phi-3 checkpoints: the target is reached, the checkpoint reloads
    with stock from_pretrained in a process without compress, and its logits on the saved probe equal the
    in-memory model's."""
    ckpt = save_tiny(family, tmp_path / "ckpt")
    d = tmp_path / "run"
    r = _cli(["model=hf", f"model.name={ckpt}", "prune=structured", "prune.importance=activation", "prune.ratio=0.2",
              "output.save_model=true", *SMALL, f"hydra.run.dir={d}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((d / "results.json").read_text())
    assert data["structured"]["achieved_ratio"] >= 0.2 - 0.015
    save = next(s for s in data["stages"] if s["name"] == "save")
    assert save["reload"]["ok"] and save["reload"]["weights_equal"]  # verified by the save step itself
    _reload_check(d, tmp_path)

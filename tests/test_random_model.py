"""``benchmarks/random_model.py``, the scale benchmarks' model writer: a normal sharded checkpoint that stock
``from_pretrained`` loads, written one block at a time, whose shallower variant is a prefix of the deeper one."""

import json

import torch
import transformers as T

from benchmarks.random_model import write_random_llama

SMALL = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, vocab_size=320)


def test_written_checkpoint_reloads_stock_and_depths_share_a_prefix(tmp_path):
    a = write_random_llama(tmp_path / "d2", 2, "float32", seed=3, **SMALL)
    b = write_random_llama(tmp_path / "d3", 3, "float32", seed=3, **SMALL)
    assert a["shards"] == 3 and b["shards"] == 4
    index = json.loads((tmp_path / "d3" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4 and index["metadata"]["total_size"] == b["bytes"]
    m2 = T.AutoModelForCausalLM.from_pretrained(tmp_path / "d2")
    m3 = T.AutoModelForCausalLM.from_pretrained(tmp_path / "d3")
    assert m3.config.num_hidden_layers == 3 and m3.config.intermediate_size == 176 and m3.config.num_key_value_heads == 2
    s2, s3 = m2.state_dict(), m3.state_dict()
    assert set(s2) <= set(s3) and len(s3) > len(s2)
    for k, v in s2.items():
        assert torch.equal(v, s3[k]), k
    w = s3["model.layers.2.mlp.down_proj.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002 and torch.equal(s3["model.norm.weight"], torch.ones(64))
    assert not torch.equal(s3["model.layers.0.self_attn.q_proj.weight"], s3["model.layers.1.self_attn.q_proj.weight"])
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "d3")
    ids = tok("Scale, measured.", return_tensors="pt").input_ids
    assert int(ids.max()) < 258
    with torch.no_grad():
        assert torch.isfinite(m3(ids).logits).all()
    b16 = write_random_llama(tmp_path / "h", 1, "bfloat16", seed=3, **SMALL)
    assert b16["bytes"] * 2 == write_random_llama(tmp_path / "f", 1, "float32", seed=3, **SMALL)["bytes"]
    assert T.AutoModelForCausalLM.from_pretrained(tmp_path / "h").config.dtype == torch.bfloat16

"""Write a random-weight Llama checkpoint of any width and depth to disk, one block at a time, for the
scale benchmarks (issue 20): the default model is too small to show how memory grows with depth.

The checkpoint is a normal sharded safetensors one (one shard per block, one for the embeddings, final norm
and head, and ``model.safetensors.index.json``) with a byte-level tokenizer (ids < 258; the embedding keeps
the configured vocabulary), so stock ``AutoModelForCausalLM.from_pretrained`` and ``compress model=hf
model.name=DIR`` load it. Peak memory while writing is one shard, whatever the depth (the largest is the
embeddings + head one: 1.8 GiB of RSS at Llama-2-7B widths in fp32).

Every tensor is drawn from its own generator seeded by ``seed`` and the tensor's name, so the model with 4
blocks is the first 4 blocks of the model with 8 (same embeddings, norms and head). Linears ~ N(0, 0.02²),
norms = 1, as Llama's initialiser.

    python benchmarks/random_model.py /tmp/llama7bw_4 --blocks 4               # Llama-2-7B widths, fp32
    python benchmarks/random_model.py /tmp/llama7bw_8 --blocks 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save_file

from compress.models import byte_tokenizer

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000)


def _tensor(name: str, shape, dtype, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write_random_llama(out, blocks: int, dtype: str = "float32", seed: int = 0, **widths) -> Dict:
    """Write the checkpoint to ``out``; returns its config dict and the bytes written."""
    from transformers import LlamaConfig

    w = {**LLAMA2_7B, **widths}
    h, i, nh, kv, v = (w["hidden_size"], w["intermediate_size"], w["num_attention_heads"],
                       w["num_key_value_heads"], w["vocab_size"])
    hd = h // nh
    dt = getattr(torch, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    block = {"self_attn.q_proj.weight": (nh * hd, h), "self_attn.k_proj.weight": (kv * hd, h),
             "self_attn.v_proj.weight": (kv * hd, h), "self_attn.o_proj.weight": (h, nh * hd),
             "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
             "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    outer = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    shards = [outer] + [{f"model.layers.{b}.{k}": s for k, s in block.items()} for b in range(blocks)]
    n = len(shards)
    index, total = {}, 0
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {name: _tensor(name, shape, dt, seed) for name, shape in names.items()}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        index.update({name: fname for name in names})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}, indent=1))
    tok = byte_tokenizer()
    config = LlamaConfig(num_hidden_layers=blocks, head_dim=hd, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype=dtype, **w)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    return {"config": config.to_dict(), "bytes": total, "shards": n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    for k, v in LLAMA2_7B.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    a = ap.parse_args(argv)
    widths = {k: getattr(a, k) for k in LLAMA2_7B}
    info = write_random_llama(a.out, a.blocks, a.dtype, a.seed, **widths)
    print(f"{a.out}: {a.blocks} blocks, {info['shards']} shards, {info['bytes'] / 2**30:.2f} GiB ({a.dtype})")


if __name__ == "__main__":
    main()

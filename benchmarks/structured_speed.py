"""Measured speed of structurally pruned models against the dense one, interleaved in one process.

Speed depends on the shapes only, so each cut here keeps heads/channels by index (the importance decides
quality, not speed). For each cut: prefill tokens/s at batch 1 and 8 (seq 512, last-position logits),
decode tokens/s (batch 1, KV cache, 128 new tokens), the ratios to dense, and the analytic FLOP-ratio
ceiling (linears + attention's causal seq^2 term at seq 512 + the LM head once per sequence).

    python benchmarks/structured_speed.py                       # CPU, the embedded model (real weights)
    python benchmarks/structured_speed.py --random --device cuda --dtype bfloat16   # GPU, SmolLM2 shapes

Cuts: 20% and 50% of the block parameters as MLP channels only (the default of prune=structured), the same
with one of the 3 KV groups, and 6 of 30 blocks (depth 20%).
"""

import argparse
import copy
import time

import torch
import transformers as T
from common import write

from compress.calibration.blocks import find_blocks
from compress.calibration.roles import block_structure
from compress.evaluate import flops_per_token
from compress.models import load_model
from compress.schema import ModelConfig
from compress.speed import serving_speed
from compress.structured.surgery import Keep, block_params, count_params, plan_widths, remove_blocks, remove_width

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
               rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)


def dense_model(args):
    if args.random:
        torch.manual_seed(0)
        m = T.AutoModelForCausalLM.from_config(T.LlamaConfig(**SMOLLM2), dtype=getattr(torch, args.dtype))
    else:
        m, _ = load_model(ModelConfig(device="cpu", dtype=args.dtype))
    return m.to(args.device).eval()


def cut(model, ratio, attn_fraction):
    st = block_structure(model)
    b0 = st.blocks[0]
    plan = plan_widths(b0, block_params(find_blocks(model)[1][0]), ratio, "kv_group", attn_fraction, 8)
    kv = list(range(b0.n_kv - plan.attn_remove))
    q = [h for h in range(b0.n_heads) if h // b0.group_size in kv]
    keeps = [Keep(q, kv, list(range(plan.channels - plan.channel_remove))) for _ in st.blocks]
    remove_width(model, st, keeps)
    return plan.to_dict()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    dense = dense_model(a)
    before = count_params(dense)
    f0 = flops_per_token(dense, 512)
    cuts = {"mlp_20": (0.2, 0.0), "kv1_mlp_20": (0.2, 1 / 3), "mlp_50": (0.5, 0.0), "kv1_mlp_50": (0.5, 1 / 3),
            "depth_20": None}
    models, info = {"dense": dense}, {}
    for name, spec in cuts.items():
        m = copy.deepcopy(dense)
        if spec is None:
            remove_blocks(m, list(range(12, 18)))  # 6 of 30 blocks (speed depends on the count only)
            plan = {"removed_blocks": 6}
        else:
            plan = cut(m, *spec)
        after = count_params(m)
        info[name] = {"plan": plan, "removed_block_params": before["params_blocks"] - after["params_blocks"],
                      "ratio": 1 - after["params_blocks"] / before["params_blocks"],
                      "flop_ratio_ceiling": f0["total"] / flops_per_token(m, 512)["total"]}
        models[name] = m
    t0 = time.time()
    res = serving_speed(models, batch_sizes=(1, 8), seqlen=512, rounds=a.rounds)
    for name in cuts:
        sp = res["models"][name]["speedup"]
        info[name]["speedup"] = sp
        info[name]["fraction_of_ceiling"] = {k: v / info[name]["flop_ratio_ceiling"] for k, v in sp.items()
                                             if k.startswith("prefill")}
    out = {"device": res["device"], "dtype": res["dtype"], "weights": "random" if a.random else "embedded SmolLM2",
           "seconds": time.time() - t0, "dense": res["models"]["dense"], "cuts": info, "raw": res}
    print(f"{'cut':<12} {'ratio':>6} {'ceiling':>8} {'prefill b1':>11} {'prefill b8':>11} {'decode b1':>10}")
    for name, v in info.items():
        sp = v["speedup"]
        print(f"{name:<12} {v['ratio']:>6.3f} {v['flop_ratio_ceiling']:>8.3f} {sp['prefill_b1']:>11.3f} "
              f"{sp['prefill_b8']:>11.3f} {sp['decode_b1']:>10.3f}")
    d = res["models"]["dense"]
    print(f"dense: prefill b1 {d['prefill_b1_tokens_per_s']:.0f} tok/s, b8 {d['prefill_b8_tokens_per_s']:.0f} tok/s, "
          f"decode {d['decode_b1_tokens_per_s']:.1f} tok/s on {res['device']} {res['dtype']}")
    if a.json:
        write(a.json, out)


if __name__ == "__main__":
    main()

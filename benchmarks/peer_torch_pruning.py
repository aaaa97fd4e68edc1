"""Peer: Torch-Pruning (PyPI ``torch-pruning``) on the default model, the way its LLM example prunes (group L2
magnitude, whole heads, hidden and MLP channels at one ratio), recorded as a benchmark peer, never a
dependency. Run it in its own venv:

    python3 -m venv --system-site-packages /tmp/tp && /tmp/tp/bin/pip install --no-deps torch-pruning==1.6.1
    /tmp/tp/bin/python benchmarks/peer_torch_pruning.py --json benchmarks/results/peer_torch_pruning.json

On SmolLM2-135M (9 query heads, 3 KV heads) it fails in its head grouping before pruning anything, with
and without head pruning. For comparison it also runs on a tiny random Llama without GQA (4 heads, 4 KV
heads), where it does prune; the record keeps both.
"""

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import transformers as T


def prune(model, ratio: float, heads: bool, example):
    import torch_pruning as tp

    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn") and hasattr(m, "q_proj"):
            num_heads[m.q_proj] = model.config.num_attention_heads
            num_heads[m.k_proj] = model.config.num_key_value_heads
            num_heads[m.v_proj] = model.config.num_key_value_heads
    pruner = tp.pruner.BasePruner(model, example_inputs=example, importance=imp, global_pruning=False,
                                  output_transform=lambda x: x.logits, pruning_ratio=ratio,
                                  ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=heads,
                                  prune_head_dims=False, head_pruning_ratio=ratio if heads else 0.0, round_to=4)
    before = sum(p.numel() for p in model.parameters())
    pruner.step()
    after = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model(input_ids=example)  # the pruned model still runs
    return {"params_before": before, "params_after": after, "removed": 1 - after / before}


class _Limit(Exception):
    pass


def attempt(label, make, ratio, heads, example, limit):
    import signal

    def alarm(*_):
        raise _Limit()

    t0 = time.time()
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit)
    try:
        m = make()
        ex = example if m.config.vocab_size > int(example.max()) else example % m.config.vocab_size
        res = prune(m, ratio, heads, ex)
        res["status"] = "ok"
    except _Limit:
        res = {"status": "did not finish", "error": f"no result after {limit} s (building its dependency groups)"}
    except Exception as e:  # the peer's failure is the result being recorded
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}",
               "where": traceback.format_exc().strip().splitlines()[-3:]}
    finally:
        signal.alarm(0)
    res.update(model=label, ratio=ratio, prune_num_heads=heads, seconds=round(time.time() - t0, 1))
    print(json.dumps(res))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="checkpoint dir (default: compress's converted embedded model)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--json", default="")
    ap.add_argument("--limit", type=int, default=300, help="seconds per attempt")
    ap.add_argument("--full", action="store_true", help="also the whole 30-block model (its graph build is slow: "
                    "over 10 minutes on 2 CPU cores)")
    a = ap.parse_args()
    import torch_pruning as tp

    path = a.model
    if not path:
        from compress.models import embedded_checkpoint  # only to locate the converted safetensors checkpoint

        path = str(embedded_checkpoint())
    tok = T.AutoTokenizer.from_pretrained(path)
    example = torch.tensor(tok.encode("Hello world."), dtype=torch.long).unsqueeze(0)
    real = lambda: T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731

    def tiny_mha():
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(T.LlamaConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4)).eval()

    def tiny_gqa():
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(T.LlamaConfig(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)).eval()

    def first_blocks():  # the real weights, first 2 of 30 blocks (same widths and GQA 9/3; the graph builds fast)
        m = real()
        m.model.layers = m.model.layers[:2]
        m.config.num_hidden_layers = 2
        return m

    runs = [attempt("tiny random Llama, MHA 4/4", tiny_mha, a.ratio, True, example, a.limit),
            attempt("tiny random Llama, GQA 4/2", tiny_gqa, a.ratio, True, example, a.limit),
            attempt("SmolLM2-135M first 2 blocks (GQA 9/3)", first_blocks, a.ratio, True, example, a.limit),
            attempt("SmolLM2-135M first 2 blocks (GQA 9/3)", first_blocks, a.ratio, False, example, a.limit)]
    if a.full:
        runs += [attempt("SmolLM2-135M (GQA 9/3)", real, a.ratio, True, example, a.limit),
                 attempt("SmolLM2-135M (GQA 9/3)", real, a.ratio, False, example, a.limit)]
    out = {"torch_pruning": getattr(tp, "__version__", "?"), "transformers": T.__version__, "runs": runs}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

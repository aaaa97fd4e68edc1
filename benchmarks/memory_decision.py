"""The single-pass memory decision checked at realistic widths.

A random-weight Llama of two blocks at Llama-2-7B's widths (hidden 4096, intermediate 11008, 32 heads,
fp32, vocabulary 1024 so that the embeddings stay small) is pruned on random calibration tokens, each
(method, mode) in a fresh process with ``MALLOC_ARENA_MAX=1``. Measured: the C heap in use above the
level after loading the model and the tokens (glibc ``mallinfo2``, sampled every 2 ms: the CPU analogue
of ``torch.cuda.max_memory_allocated``), against the engine's own estimate for that mode
(``compress.calibration.memory``), recorded in the prune report before any work. Then
``prune.sequential=auto`` is run with a budget between the two estimates (it must choose two passes)
and with a generous one (the single pass). A dense forward over the same tokens is the yardstick for
the seconds.

    python benchmarks/memory_decision.py --nsamples 16 --seqlen 512
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch
from common import child as run_child
from common import write

from compress.config import prune_config
from compress.core.memory import HeapPeak, PeakMemory
from compress.schema import CalibConfig
from compress.stages.prune import prune_model

MODES = {"single": "true", "two": "false"}


def build(nsamples: int, seqlen: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()  # random init (normal, std 0.02)
    g = torch.Generator().manual_seed(0)
    model.config.use_cache = False
    ids = torch.randint(0, 1024, (nsamples, seqlen), generator=g)
    return model, ids


def child(method: str, sequential: str, nsamples: int, seqlen: int, budget: float) -> dict:
    model, ids = build(nsamples, seqlen)
    gc.collect()
    base = HeapPeak()
    with base:
        pass
    if method == "fwd":
        t0 = time.perf_counter()
        with HeapPeak() as hp, torch.no_grad():
            for i in range(ids.shape[0]):
                model.model(input_ids=ids[i:i + 1], use_cache=False)
        return {"seconds": time.perf_counter() - t0, "heap_extra_mb": hp.peak_mb - base.peak_mb}
    cfg = prune_config(method=method, sparsity=0.5, sequential=sequential, memory_budget=budget)
    t0 = time.perf_counter()
    with HeapPeak() as hp, PeakMemory() as pm:
        rep = prune_model(model, None, cfg, CalibConfig(nsamples=nsamples, seqlen=seqlen), calib_ids=ids, progress=False)
    secs = time.perf_counter() - t0
    chosen = rep.mode["chosen"]
    est = rep.mode["estimate"]["single_pass_mb" if chosen == "single_pass" else "two_pass_mb"]
    extra = hp.peak_mb - base.peak_mb
    return {"method": method, "sequential": sequential, "memory_budget": budget, "chosen": chosen,
            "reason": rep.mode["reason"], "estimate_mb": est, "heap_extra_mb": extra, "estimate_over_measured": est / extra,
            "estimates": rep.mode["estimate"], "free_mb": rep.mode["free_mb"], "budget_mb": rep.mode["budget_mb"],
            "rss_peak_mb": pm.peak_mb, "heap_base_mb": base.peak_mb, "seconds": secs,
            "achieved": rep.achieved()}


def measure(args, *extra) -> dict:
    return run_child(__file__, [*extra, "--nsamples", args.nsamples, "--seqlen", args.seqlen],
                     env={"MALLOC_ARENA_MAX": "1"})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--out", default="benchmarks/results/memory_decision_7b_widths.json")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        method, seq, budget = args.child[0], args.child[1], float(args.child[2])
        print(json.dumps(child(method, seq, args.nsamples, args.seqlen, budget)))
        return 0
    out = {"model": "random Llama, 2 blocks, hidden 4096, intermediate 11008, 32 heads, fp32, vocab 1024",
           "tokens": f"{args.nsamples} x {args.seqlen} random tokens, batch 1",
           "measure": "glibc heap in use above the level after loading (MALLOC_ARENA_MAX=1), 2 ms sampling",
           "runs": []}
    fwd = measure(args, "fwd", "-", 1.0, 0)
    out["dense_forward"] = fwd
    print("dense forward", json.dumps(fwd), flush=True)
    for method in args.methods.split(","):
        res = {}
        for mode, seq in MODES.items():
            r = measure(args, method, seq, 1.0, 0)
            r["x_dense_forward"] = r["seconds"] / fwd["seconds"]
            res[mode] = r
            out["runs"].append(r)
            print(method, mode, json.dumps(r), flush=True)
        # auto at a budget between the two estimates (two passes) and at a generous one (single pass)
        est = res["single"]["estimates"]
        free = res["single"]["free_mb"]
        mid = (est["single_pass_mb"] + est["two_pass_mb"]) / 2 / free
        for budget in (mid, 1.0):
            r = measure(args, method, "auto", budget, 0)
            r["x_dense_forward"] = r["seconds"] / fwd["seconds"]
            out["runs"].append(r)
            print(method, "auto", round(budget, 4), json.dumps(r), flush=True)
    write(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

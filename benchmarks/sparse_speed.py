"""Measured speed of 2:4 sparsity on the GPU's sparse tensor cores (needs CUDA, compute capability >= 8.0).

Two measurements, each against the dense kernels in the same process:

1. ``linear``: one ``F.linear`` per weight shape (the default model's and larger ones), M tokens,
   dense vs ``to_sparse_semi_structured`` (CUTLASS and cuSPARSELt), fp16 and bf16.
2. ``model``: the default model pruned to exact 2:4 (magnitude; the kernels do not care how the mask
   was chosen), bf16, prefill throughput dense vs 2:4 at a few batch sizes, plus the largest logit
   difference between the 2:4 kernels and the same masked weights on the dense kernels.

    python benchmarks/sparse_speed.py --out benchmarks/results/sparse_speed_h100.json

On a machine without such a GPU it says so and exits 0 (there is no 2:4 kernel on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from common import write

from compress.config import prune_config
from compress.core.masks import nm_mask
from compress.models import load_model
from compress.schema import ModelConfig
from compress.speed import prefill_throughput, semi_structured_available, to_semi_structured
from compress.stages.prune import prune_model

SHAPES = {  # name: (out_features, in_features)
    "smollm2.q_proj": (576, 576), "smollm2.k_proj": (192, 576), "smollm2.gate_proj": (1536, 576),
    "smollm2.down_proj": (576, 1536),
    "llama7b.q_proj": (4096, 4096), "llama7b.gate_proj": (11008, 4096), "llama7b.down_proj": (4096, 11008),
    "llama70b.gate_proj": (28672, 8192), "llama70b.down_proj": (8192, 28672),
}


def cuda_time_ms(fn, iters: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def graph_time_ms(fn, iters: int = 50) -> float:
    """Time ``fn`` replayed from a CUDA graph: kernel time without host-side launch/plan overhead
    (what ``torch.compile(mode="reduce-overhead")`` or a serving engine's graphs give in deployment)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return cuda_time_ms(g.replay, iters)


def bench_linear(tokens: int, dtypes, backends):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    rows = []
    for name, (n_out, n_in) in SHAPES.items():
        for dt in dtypes:
            g = torch.Generator(device="cuda").manual_seed(0)
            w = torch.randn(n_out, n_in, device="cuda", dtype=dt, generator=g)
            w = w * nm_mask(w.abs(), 2, 4)
            x = torch.randn(tokens, n_in, device="cuda", dtype=dt, generator=g)
            dense_ms = cuda_time_ms(lambda: F.linear(x, w))
            for be in backends:
                SparseSemiStructuredTensor._FORCE_CUTLASS = be == "cutlass"
                try:
                    ws = to_sparse_semi_structured(w)
                    err = (F.linear(x, ws) - F.linear(x, w)).abs().max().item()
                    sparse_ms = cuda_time_ms(lambda: F.linear(x, ws))
                    row = {"shape": name, "out": n_out, "in": n_in, "tokens": tokens, "dtype": str(dt), "backend": be,
                           "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                           "max_abs_diff": err}
                    try:
                        gd = graph_time_ms(lambda: F.linear(x, w))
                        gs = graph_time_ms(lambda: F.linear(x, ws))
                        row.update(graph_dense_ms=gd, graph_sparse_ms=gs, graph_speedup=gd / gs)
                    except Exception as e:
                        row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                except Exception as e:  # a backend missing from this torch build is reported, not fatal
                    row = {"shape": name, "dtype": str(dt), "backend": be, "error": f"{type(e).__name__}: {e}"[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def bench_model(batch_sizes, seqlen: int, backend: str):
    model, tok = load_model(ModelConfig(device="cuda", dtype="bfloat16"))
    dense = {bs: prefill_throughput(model, bs, seqlen) for bs in batch_sizes}
    prune_model(model, tok, prune_config(method="magnitude", pattern="2:4"), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (4, seqlen), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
    masked = {bs: prefill_throughput(model, bs, seqlen) for bs in batch_sizes}
    def graphed(bs):
        x = torch.randint(0, model.config.vocab_size, (bs, seqlen), generator=torch.Generator().manual_seed(2)).cuda()
        with torch.no_grad():
            try:
                return bs * seqlen / (graph_time_ms(lambda: model(input_ids=x, use_cache=False), iters=10) / 1e3)
            except Exception as e:
                print(f"graph capture failed: {type(e).__name__}: {e}"[:300], flush=True)
                return None

    masked_graph = {bs: graphed(bs) for bs in batch_sizes}
    converted = to_semi_structured(model, backend=backend)
    with torch.no_grad():
        diff = (model(input_ids=ids, use_cache=False).logits.float() - ref).abs().max().item()
    sparse = {bs: prefill_throughput(model, bs, seqlen) for bs in batch_sizes}
    sparse_graph = {bs: graphed(bs) for bs in batch_sizes}
    rows = []
    for bs in batch_sizes:
        row = {"batch_size": bs, "seqlen": seqlen, "backend": backend, "dense_tokens_per_s": dense[bs]["tokens_per_s"],
               "masked_dense_tokens_per_s": masked[bs]["tokens_per_s"],
               "sparse24_tokens_per_s": sparse[bs]["tokens_per_s"],
               "speedup": sparse[bs]["tokens_per_s"] / dense[bs]["tokens_per_s"],
               "graph_dense_tokens_per_s": masked_graph[bs], "graph_sparse24_tokens_per_s": sparse_graph[bs],
               "graph_speedup": (sparse_graph[bs] / masked_graph[bs]) if masked_graph[bs] and sparse_graph[bs] else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"converted_linears": len(converted), "max_abs_logit_diff_vs_masked_dense": diff,
            "logit_scale": ref.abs().max().item(), "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="rows of the activation matrix (batch x seqlen)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/sparse_speed.json")
    args = ap.parse_args(argv)
    if not semi_structured_available():
        print("sparse_speed: no CUDA GPU with compute capability >= 8.0 here; 2:4 kernels cannot be measured.")
        return 0
    out = {"cuda": torch.version.cuda}
    out["linear"] = bench_linear(args.tokens, (torch.float16, torch.bfloat16), ("cutlass", "cusparselt"))
    if not args.skip_model:
        out["model"] = {}
        for be in ("cutlass", "cusparselt"):
            try:
                out["model"][be] = bench_model([int(b) for b in args.batch_sizes.split(",")], args.seqlen, be)
            except Exception as e:  # e.g. CUTLASS 2:4 kernels are built for compute capability 8.x only
                out["model"][be] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(json.dumps({"model_backend": be, **out["model"][be]}), flush=True)
    write(args.out, out)
    print("| shape | out x in | dtype | backend | dense ms | 2:4 ms | speed-up | graphed speed-up |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in out["linear"]:
        if "error" in r:
            print(f"| {r['shape']} | | {r['dtype']} | {r['backend']} | error | | |")
        else:
            print(f"| {r['shape']} | {r['out']}x{r['in']} | {r['dtype']} | {r['backend']} | {r['dense_ms']:.3f} | "
                  f"{r['sparse_ms']:.3f} | {r['speedup']:.2f} | {r.get('graph_speedup', float('nan')):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prune-stage speed and memory against the reference code's loop, same machine, same process.

Speed (``--what speed``): per configuration, ``--repeat`` rounds of [dense forward over the 32 x 512
calibration tokens, the reference loop (``benchmarks/reference_port.py``), each of our ``--modes``],
interleaved so that a slow spell of this shared machine hits all of them. Every prune starts from the
same dense weights. Reported: seconds per round, medians, our time / the reference loop's time
(median of the per-round ratios) and × the median dense forward.

Memory (``--what memory``): each of dense forward, reference loop and our modes in a fresh process
(``MALLOC_ARENA_MAX=1``), measuring the C heap in use (glibc ``mallinfo2``, the CPU analogue of
``torch.cuda.max_memory_allocated``) above the process's level after loading the model and the
calibration tokens, and the peak RSS. Perplexities are in ``prune_bench.py``.

    python benchmarks/prune_speed.py --only wanda_50,sparsegpt_50 --repeat 3
    python benchmarks/prune_speed.py --what memory --only wanda_50,sparsegpt_50
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
from common import child, write, yardstick
from prune_bench import REF
from reference_port import prune_reference_style

from compress.config import prune_config
from compress.core.config import parse_pattern
from compress.core.memory import HeapPeak, PeakMemory
from compress.data import load_calibration
from compress.models import load_model
from compress.schema import CalibConfig, ModelConfig
from compress.stages.prune import prune_model

MODES = {"seq": dict(sequential=True), "ref": dict(sequential=False)}


def _setup(batch_size: int = 1):
    model, tok = load_model(ModelConfig())
    calib = CalibConfig(nsamples=32, seqlen=512, seed=0, batch_size=batch_size)
    ids, _ = load_calibration(tok, calib.source, calib.nsamples, calib.seqlen, calib.seed)
    return model, tok, calib, ids


def _run(model, tok, calib, ids, name: str, mode: str) -> None:
    kwargs = REF[name][0]
    if mode == "fwd":
        yardstick(model, ids, calib.batch_size)
    elif mode == "fwd_body":  # the decoder stack without the LM head (no logits), the stricter bound
        with torch.no_grad():
            for i in range(0, ids.shape[0], calib.batch_size):
                model.base_model(input_ids=ids[i:i + calib.batch_size], use_cache=False)
    elif mode == "port":
        cfg = prune_config(**kwargs)
        prune_reference_style(model, ids, cfg.method, cfg.sparsity, parse_pattern(cfg.pattern))
    else:
        loop = MODES[mode] if kwargs["method"] != "magnitude" else {}  # magnitude has no block loop
        prune_model(model, tok, prune_config(**{**loop, **kwargs}), calib, calib_ids=ids, progress=False)


def speed(names, modes, repeat, batch_size=1):
    model, tok, calib, ids = _setup(batch_size)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"protocol": f"P1 calibration (32 x 512 tokens, batch {calib.batch_size}; the port at 1), fp32 CPU", "configs": {}}
    for name in names:
        times = {m: [] for m in ["fwd", "port", *modes]}
        for r in range(repeat):
            for m in times:
                model.load_state_dict(dense)
                t0 = time.perf_counter()
                _run(model, tok, calib, ids, name, m)
                times[m].append(time.perf_counter() - t0)
            print(name, f"round {r}:", "  ".join(f"{m} {t[-1]:.1f}s" for m, t in times.items()), flush=True)
        med = {m: statistics.median(t) for m, t in times.items()}
        res = {"seconds": times, "median_seconds": med,
               "x_dense_forward": {m: med[m] / med["fwd"] for m in times if m != "fwd"}}
        for m in modes:
            res[f"{m}_over_port"] = statistics.median(a / b for a, b in zip(times[m], times["port"]))
        out["configs"][name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k != "seconds"}, default=lambda x: round(x, 3)),
              flush=True)
    model.load_state_dict(dense)
    return out


def _memory_child(name, mode, batch_size=1):
    model, tok, calib, ids = _setup(int(batch_size))
    gc.collect()
    base = HeapPeak()
    with base:
        pass
    with HeapPeak() as hp, PeakMemory() as pm:
        _run(model, tok, calib, ids, name, mode)
    print(json.dumps({"heap_base_mb": base.peak_mb, "heap_peak_mb": hp.peak_mb,
                      "heap_extra_mb": hp.peak_mb - base.peak_mb, "rss_peak_mb": pm.peak_mb}))


def memory(names, modes, batch_size=1):
    out = {"measure": "glibc heap in use above the level after loading (MALLOC_ARENA_MAX=1), and peak RSS",
           "batch_size": batch_size, "configs": {}}
    fwd = ["fwd", "fwd_body"] if batch_size > 1 else ["fwd"]
    jobs = [(names[0], f) for f in fwd] + [(n, m) for n in names for m in (["port"] if batch_size == 1 else []) + modes]
    for name, mode in jobs:
        res = child(__file__, [name, mode, batch_size], env={"MALLOC_ARENA_MAX": "1"})
        key = {"fwd": "dense_forward", "fwd_body": "dense_forward_no_lm_head"}.get(mode, f"{name}/{mode}")
        out["configs"][key] = res
        print(key, json.dumps(res, default=lambda x: round(x, 1)), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="speed", choices=["speed", "memory"])
    ap.add_argument("--only", default="wanda_50,sparsegpt_50")
    ap.add_argument("--modes", default="seq", help="ours, comma-separated: seq (single pass), ref (two passes)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch-size", type=int, default=1,
                    help="calibration batch size of the dense forward and our modes (the port stays at 1, as the "
                         "reference; memory runs at > 1 skip it and add a forward without the LM head)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _memory_child(*args.child)
        return 0
    names = [n for n in args.only.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    out = (speed(names, modes, args.repeat, args.batch_size) if args.what == "speed"
           else memory(names, modes, args.batch_size))
    write(args.out or f"benchmarks/results/prune_{args.what}_vs_port.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

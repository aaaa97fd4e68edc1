"""Quantization under protocol P1: one process, one configuration at a time, each from a fresh model.

P1: the embedded SmolLM2-135M, fp32, CPU; calibration 32 x 512 tokens of the WikiText-2 validation text
(reference sampling rule, seed 0); perplexity on the first 40 x 512 tokens of WikiText-2 raw test.
Rows: ppl, bits per weight of the quantized linears (codes + float32 scales + zero points), the packed
footprint of the whole model beside fp32, quant seconds and x one dense forward over the calibration
tokens (measured at the start of the same run), peak RSS.

    python benchmarks/quant_bench.py                     # the full table
    python benchmarks/quant_bench.py --only gptq_w4_g64_sym,rtn_w4_g64_sym
    python benchmarks/quant_bench.py --list

The embedded model's weights were Q4_1 (asymmetric 4-bit, groups of 32) before dequantization: a 4-bit
asymmetric group-32 quantizer recovers them almost exactly. Rows at g32 are flagged.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from compress.config import CalibConfig, ModelConfig, PruneConfig, QuantConfig
from compress.data import load_calibration
from compress.evaluate import perplexity
from compress.models import load_model
from compress.pruning import prune_model
from compress.quant.engine import quantize_model
from compress.quant.stage import check_joint, dense_forward_seconds, packed_footprint
from compress.record import PeakMemory


def _q(method, bits, group, sym, **kw):
    if method == "gptq":
        kw.setdefault("act_order", False)  # explicit: rows are named by what they run, not by the default
    return dict(method=method, bits=bits, group_size=group, symmetric=sym, **kw)


CONFIGS = {"dense": None,
           "bnb_int8": dict(method="bnb", bits=8), "bnb_nf4": dict(method="bnb", bits=4)}
for bits in (8, 4, 3):
    for group in (64, -1):
        CONFIGS[f"rtn_w{bits}_{'g64' if group == 64 else 'ch'}_sym"] = _q("rtn", bits, group, True)
CONFIGS["rtn_w4_g64_asym"] = _q("rtn", 4, 64, False)
CONFIGS["rtn_w4_g32_asym (Q4_1 origin)"] = _q("rtn", 4, 32, False)
for bits in (4, 3):
    for group in (64, -1):
        for sym in (True, False):
            CONFIGS[f"gptq_w{bits}_{'g64' if group == 64 else 'ch'}_{'sym' if sym else 'asym'}"] = _q("gptq", bits, group, sym)
CONFIGS["gptq_w4_g64_asym_actorder_mse"] = _q("gptq", 4, 64, False, act_order=True, mse=True)
CONFIGS["gptq_w4_g64_asym_mse"] = _q("gptq", 4, 64, False, mse=True)
CONFIGS["gptq_w4_g32_asym (Q4_1 origin)"] = _q("gptq", 4, 32, False)
# the peer's setting: llm-compressor's GPTQModifier orders columns by activation ("static") by default
for bits, group in ((4, 64), (4, -1), (3, 64), (3, -1)):
    CONFIGS[f"gptq_w{bits}_{'g64' if group == 64 else 'ch'}_sym_actorder"] = _q("gptq", bits, group, True, act_order=True)
CONFIGS["gptq_w4_g64_sym_actorder_mse"] = _q("gptq", 4, 64, True, act_order=True, mse=True)
CONFIGS["gptq_w4_ch_sym_actorder_mse"] = _q("gptq", 4, -1, True, act_order=True, mse=True)
CONFIGS["gptq_w4_g64_asym_actorder"] = _q("gptq", 4, 64, False, act_order=True)
CONFIGS["gptq_w4_ch_asym_actorder"] = _q("gptq", 4, -1, False, act_order=True)
# joint sparsity + quantization: two passes (SparseGPT, then GPTQ with the zeros held) and one pass (mask
# and grid in the same column loop); the best_* recipes' pruning, then GPTQ (one pass: no reconstruction,
# which would move the quantized weights off their grid)
SGPT50, SGPT24 = dict(method="sparsegpt", sparsity=0.5), dict(method="sparsegpt", pattern="2:4")
BEST50 = dict(method="sparsegpt", sparsity=0.5, sequential="true", reconstruct_epochs=2, reconstruct_lr=1e-4,
              dense_stats=True)
BEST24 = dict(method="sparsegpt", pattern="2:4", sequential="true", reconstruct_epochs=3, reconstruct_lr=1e-4,
              dense_stats=True)
for label, prune in (("sparsegpt_50", SGPT50), ("sparsegpt_2of4", SGPT24), ("best_unstructured_50", BEST50),
                     ("best_2of4", BEST24)):
    CONFIGS[f"{label}+gptq_w4_g64 (two passes)"] = dict(_q("gptq", 4, 64, True), prune=prune)
    one = dict(prune, reconstruct_epochs=0) if "reconstruct_epochs" in prune else prune
    CONFIGS[f"{label}+gptq_w4_g64 (one pass)"] = dict(_q("gptq", 4, 64, True, joint=True), prune=one)
    CONFIGS[f"{label}+gptq_w4_g64_actorder (two passes)"] = dict(_q("gptq", 4, 64, True, act_order=True), prune=prune)
    CONFIGS[f"{label}+gptq_w4_g64_actorder (one pass)"] = dict(_q("gptq", 4, 64, True, joint=True, act_order=True),
                                                                prune=one)
    CONFIGS[f"{label}+gptq_w4_g64_mse (two passes)"] = dict(_q("gptq", 4, 64, True, mse=True), prune=prune)
    CONFIGS[f"{label}+gptq_w4_g64_actorder_mse (two passes)"] = dict(_q("gptq", 4, 64, True, act_order=True, mse=True),
                                                                      prune=prune)


RELOAD = r"""
import hashlib, json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
m(input_ids=torch.zeros(1, 4, dtype=torch.long))  # compressed-tensors decompresses on the first forward
out = {}
for n, mod in m.named_modules():
    if isinstance(mod, torch.nn.Linear) and ".layers." in n:
        w = mod.weight.detach().float().contiguous() + 0.0  # values: -0.0 and +0.0 hash alike
        nm = None
        if w.shape[1] % 4 == 0:
            nm = bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
        out[n] = {"sha": hashlib.sha256(w.numpy().tobytes()).hexdigest(), "zeros": int((w == 0).sum()), "nm24": nm}
print(json.dumps(out))
"""


def reload_check(model, rep, qcfg, tok, pattern):
    """Save as compressed-tensors, reload in a process that imports only torch and transformers: every
    quantized weight bitwise equal, zero counts identical, N:M intact."""
    import hashlib
    import subprocess
    import sys
    import tempfile

    from compress.calibration import resolve_targets, weight_matrix
    from compress.quant.export import save_compressed_tensors, sparsity_sidecar
    from compress.quant.grid import GridSpec

    spec = GridSpec(qcfg.bits, qcfg.symmetric, qcfg.group_size)
    flat = resolve_targets(model)
    weights = {n: weight_matrix(m).detach() for n, m in zip(flat.qualified_names(), flat.flat().values())}
    with tempfile.TemporaryDirectory() as d:
        save_compressed_tensors(model, d, rep.params, spec, tok, sidecar=sparsity_sidecar(weights, pattern))
        p = subprocess.run([sys.executable, "-c", RELOAD, d], capture_output=True, text=True, timeout=900, cwd=d)
    if p.returncode:
        return {"reload_ok": False, "error": p.stderr[-500:]}
    got = json.loads(p.stdout.strip().splitlines()[-1])
    equal = all(got[n]["sha"] == hashlib.sha256((w.float().contiguous() + 0.0).numpy().tobytes()).hexdigest()
                for n, w in weights.items())
    zeros_equal = all(got[n]["zeros"] == int((w == 0).sum()) for n, w in weights.items())
    nm = all(v["nm24"] for v in got.values()) if pattern == "2:4" else None
    return {"reload_ok": equal and zeros_equal and nm is not False, "reload_weights_equal": equal,
            "reload_zeros_equal": zeros_equal, "reload_nm_exact": nm,
            "reload_zeros": sum(v["zeros"] for v in got.values())}


def run(name, spec, model_cfg, calib, ids, fwd, reload=False):
    model, tok = load_model(model_cfg)
    row = {"name": name}
    prune = qcfg = rep = pattern = None
    eval_s = 0.0
    t0 = time.perf_counter()
    with PeakMemory("cpu") as pm:
        if spec is not None:
            spec = dict(spec)
            prune = spec.pop("prune", None)
            pattern = None
            qcfg = QuantConfig(**spec)
            if prune is not None:
                t1 = time.perf_counter()
                r = prune_model(model, tok, PruneConfig(**prune), calib, calib_ids=ids, progress=False,
                                quant=qcfg if qcfg.joint else None)
                pattern = prune.get("pattern")
                row["prune_seconds"] = r.seconds
                row["sparsity"] = r.achieved()
                if not qcfg.joint:  # the pruned model's own ppl (its seconds are taken out of the total)
                    te = time.perf_counter()
                    row["ppl_pruned"] = perplexity(model, tok, "wikitext2", 512, 40, progress=False)["ppl"]
                    eval_s = time.perf_counter() - te
            if qcfg.joint:
                rep = r.joint_quant
                check_joint(model, rep, qcfg, pattern)
            else:
                t1 = time.perf_counter()
                model, rep = quantize_model(model, tok, qcfg, calib, calib_ids=ids, pattern=pattern, progress=False)
            row.update(rep.summary())
            row.update(packed_footprint(model, rep), quant_seconds=time.perf_counter() - t1, check_ok=rep.check["ok"],
                       nm_exact=rep.check.get("nm_exact"), mode=rep.mode.get("chosen"))
    row["seconds"] = time.perf_counter() - t0 - eval_s
    row["x_dense_forward"] = row.get("quant_seconds", 0.0) / fwd
    row["peak_rss_mb"] = pm.peak_mb
    if reload and spec is not None and prune is not None and qcfg.method in ("rtn", "gptq"):
        row.update(reload_check(model, rep, qcfg, tok, pattern))  # after the timings
    row["ppl"] = perplexity(model, tok, "wikitext2", 512, 40, progress=False)["ppl"]
    row["flag"] = "Q4_1 origin: g32 asymmetric 4-bit recovers the dequantized weights" if "g32" in name else ""
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--reload", action="store_true", help="rows with a prune stage: save, reload with stock "
                    "transformers in a fresh process, check weights, zeros and N:M")
    ap.add_argument("--out", default="benchmarks/results/quant_p1.json")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CONFIGS))
        return 0
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    model_cfg = ModelConfig(device="cpu")
    model, tok = load_model(model_cfg)
    calib = CalibConfig(nsamples=32, seqlen=512, seed=0)
    ids, _ = load_calibration(tok, calib.source, calib.nsamples, calib.seqlen, calib.seed)
    fwd = dense_forward_seconds(model, ids)
    del model
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__},
           "protocol": "P1 (SmolLM2-135M fp32 CPU, calibration 32 x 512 seed 0, ppl on 40 x 512 of wiki.test.raw)",
           "dense_forward_seconds": fwd, "rows": []}
    print(f"dense forward over the calibration tokens: {fwd:.1f}s", flush=True)
    for name in names:
        row = run(name, CONFIGS[name], model_cfg, calib, ids, fwd, args.reload)
        out["rows"].append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

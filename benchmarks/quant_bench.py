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
import tempfile
import time

from common import write, yardstick

from compress.calibration.targets import resolve_targets
from compress.config import make_config, prune_config, quant_config
from compress.core.memory import PeakMemory
from compress.core.modules import weights_fingerprint
from compress.data import load_calibration
from compress.evaluate import perplexity
from compress.models import load_model
from compress.reload import verify_saved
from compress.schema import CalibConfig, ModelConfig
from compress.stages.prune import prune_model
from compress.stages.quant import CompressedTensorsSaver, packed_footprint, quantize_model


def _q(method, bits, group, sym, **kw):
    if method in ("gptq", "sparsegpt_gptq"):
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
def _joint(prune, **kw):
    """The one-pass row of a prune setting: quant=sparsegpt_gptq with the prune setting's sparsity keys (block
    reconstruction left out: it would move the quantized weights off their grid)."""
    keep = {k: v for k, v in prune.items() if k in ("sparsity", "pattern", "sequential", "dense_stats")}
    return dict(_q("sparsegpt_gptq", 4, 64, True, **kw), **keep)


for label, prune in (("sparsegpt_50", SGPT50), ("sparsegpt_2of4", SGPT24), ("best_unstructured_50", BEST50),
                     ("best_2of4", BEST24)):
    CONFIGS[f"{label}+gptq_w4_g64 (two passes)"] = dict(_q("gptq", 4, 64, True), prune=prune)
    CONFIGS[f"{label}+gptq_w4_g64 (one pass)"] = _joint(prune, act_order=False)
    CONFIGS[f"{label}+gptq_w4_g64_actorder (two passes)"] = dict(_q("gptq", 4, 64, True, act_order=True), prune=prune)
    CONFIGS[f"{label}+gptq_w4_g64_actorder (one pass)"] = _joint(prune, act_order=True)
    CONFIGS[f"{label}+gptq_w4_g64_mse (two passes)"] = dict(_q("gptq", 4, 64, True, mse=True), prune=prune)
    CONFIGS[f"{label}+gptq_w4_g64_actorder_mse (two passes)"] = dict(_q("gptq", 4, 64, True, act_order=True, mse=True),
                                                                      prune=prune)


# activation quantization (issue 21): the peer's W8A8 / FP8_DYNAMIC schemes, SmoothQuant (alpha 0.5, the
# peer's default strength and mappings), rotations against none at 4 bits and with per-tensor activations
SQ = dict(method="smoothquant", alpha=0.5)
ROT = dict(method="rotation")
for label, q in (("w8a8", dict(scheme="w8a8")), ("fp8_dynamic", dict(scheme="fp8_dynamic")),
                 ("w8a8_static", dict(scheme="w8a8_static")), ("fp8", dict(scheme="fp8"))):
    CONFIGS[f"{label}_rtn"] = dict(method="rtn", **q)
    CONFIGS[f"{label}_gptq_actorder"] = dict(method="gptq", act_order=True, **q)
    CONFIGS[f"{label}_sq_rtn"] = dict(method="rtn", transform=SQ, **q)
    CONFIGS[f"{label}_sq_gptq_actorder"] = dict(method="gptq", act_order=True, transform=SQ, **q)
    CONFIGS[f"{label}_rot_rtn"] = dict(method="rtn", transform=ROT, **q)
    CONFIGS[f"{label}_rot_gptq_actorder"] = dict(method="gptq", act_order=True, transform=ROT, **q)
for label, q in (("w4a16_g64", dict(scheme="w4a16", group_size=64)), ("w4a8_g64", dict(scheme="w4a8", group_size=64)),
                 ("w4a8_static_g64", dict(bits=4, group_size=64, symmetric=True, activations="int8", act_strategy="tensor",
                                            act_dynamic=False))):
    CONFIGS[f"{label}_rtn"] = dict(method="rtn", **q)
    CONFIGS[f"{label}_gptq_actorder"] = dict(method="gptq", act_order=True, **q)
    CONFIGS[f"{label}_rot_rtn"] = dict(method="rtn", transform=ROT, **q)
    CONFIGS[f"{label}_rot_gptq_actorder"] = dict(method="gptq", act_order=True, transform=ROT, **q)


def reload_check(model, rep, tok, nm):
    """Save as compressed-tensors and reload in a process that imports only torch and transformers
    (:func:`compress.reload.verify_saved`): every quantized weight bitwise equal, zero counts identical."""
    with tempfile.TemporaryDirectory() as d:
        CompressedTensorsSaver(rep, [".*"], [], nm).save(model, tok, d)
        check = verify_saved(d, weights_fingerprint(model, resolve_targets(model).qualified_names()))
    return {"reload_ok": check["ok"], "reload_weights_equal": check.get("weights_equal"),
            "reload_zeros_equal": check.get("zeros_equal"), "reload_error": check.get("error")}


def run(name, spec, model_cfg, calib, ids, fwd, reload=False):
    model, tok = load_model(model_cfg)
    row = {"name": name}
    eval_s = 0.0
    t0 = time.perf_counter()
    with PeakMemory("cpu") as pm:
        spec = dict(spec or {})
        prune = spec.pop("prune", None)
        tf = dict(spec.pop("transform", None) or {})
        transforms = [make_config("transform", tf.pop("method"), **tf)] if tf else []
        nm = None
        if prune is not None:  # two passes: the prune stage, then the quantizer with the zeros held
            r = prune_model(model, tok, prune_config(**prune), calib, calib_ids=ids, progress=False)
            nm = prune_config(**prune).nm
            row["prune_seconds"] = r.seconds
            row["sparsity"] = r.achieved()
            te = time.perf_counter()  # the pruned model's own ppl (its seconds are taken out of the total)
            row["ppl_pruned"] = perplexity(model, tok, "wikitext2", 512, 40, progress=False)["ppl"]
            eval_s = time.perf_counter() - te
        if spec:
            qcfg = quant_config(**spec)
            t1 = time.perf_counter()
            model, rep = quantize_model(model, tok, qcfg, calib, calib_ids=ids, nm=nm, transforms=transforms,
                                        progress=False)
            if transforms:
                row["transforms"] = rep.transforms
                row["prepared"] = rep.prepared
            nm = nm or getattr(qcfg, "nm", None)
            if getattr(qcfg, "sparsity", None) is not None:  # the joint method: one pass, its own sparsity
                row["prune_seconds"], row["sparsity"] = 0.0, rep.summary()["achieved_sparsity"]
            row.update(rep.summary())
            row.update(packed_footprint(model, rep), quant_seconds=time.perf_counter() - t1, check_ok=rep.check["ok"],
                       nm_exact=rep.check.get("nm_exact"))
    row["seconds"] = time.perf_counter() - t0 - eval_s
    row["x_dense_forward"] = row.get("quant_seconds", 0.0) / fwd
    row["peak_rss_mb"] = pm.peak_mb
    if reload and spec and "sparsity" in row and spec["method"] != "bnb":
        row.update(reload_check(model, rep, tok, nm))  # after the timings
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
    ap.add_argument("--extra", default="", help='JSON dict of name -> row spec to add: quant config keys, '
                    'optionally "prune": {prune config keys} and "transform": {transform config keys}')
    args = ap.parse_args(argv)
    CONFIGS.update(json.loads(args.extra) if args.extra else {})
    if args.list:
        print("\n".join(CONFIGS))
        return 0
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    model_cfg = ModelConfig(device="cpu")
    model, tok = load_model(model_cfg)
    calib = CalibConfig(nsamples=32, seqlen=512, seed=0)
    ids, _ = load_calibration(tok, calib.source, calib.nsamples, calib.seqlen, calib.seed)
    fwd = yardstick(model, ids)
    del model
    out = {"protocol": "P1 (SmolLM2-135M fp32 CPU, calibration 32 x 512 seed 0, ppl on 40 x 512 of wiki.test.raw)",
           "dense_forward_seconds": fwd, "rows": []}
    print(f"dense forward over the calibration tokens: {fwd:.1f}s", flush=True)
    for name in names:
        row = run(name, CONFIGS[name], model_cfg, calib, ids, fwd, args.reload)
        out["rows"].append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        write(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

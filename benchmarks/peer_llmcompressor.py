"""Side by side with the peer llm-compressor (vLLM project) under protocol P1, on this machine.

llm-compressor is a benchmark peer only, never a dependency of compress. It pins transformers<=5.17,
so it lives in its own virtual environment that sees the system torch and compress:

    python3 -m venv --system-site-packages /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor==0.14.0.1
    /tmp/llmc/bin/python benchmarks/peer_llmcompressor.py --out benchmarks/results/peer_llmcompressor_p1.json

Same model file, same 32 x 512 calibration windows (compress's reference sampling rule, seed 0), same
perplexity protocol (compress.evaluate: first 40 x 512 tokens of WikiText-2 raw test), fp32, CPU,
batch 1. llm-compressor runs its default ``sequential`` pipeline (one decoder layer at a time, the
pruned outputs propagated), targets every Linear of the decoder layers, ignores ``lm_head``. The
seconds are the whole ``oneshot`` call (its model tracing and calibration bookkeeping included) and,
as everywhere in BENCHMARKS.md, also a ratio to one dense forward over the calibration tokens measured
at the start of the same process. Run ``benchmarks/prune_bench.py`` for compress's side in the same
session (one process at a time) and compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import write, yardstick

from compress.core.masks import check_nm
from compress.data import load_calibration
from compress.evaluate import perplexity, size_metrics
from compress.models import embedded_checkpoint

CONFIGS = {  # name -> (modifier class name, kwargs); quantization rows: symmetric int weights, lm_head kept
    "gptq_w4_g64": ("GPTQModifier", dict(bits=4, group=64, block_size=128, dampening_frac=0.01)),
    "gptq_w4_ch": ("GPTQModifier", dict(bits=4, group=-1, block_size=128, dampening_frac=0.01)),
    "gptq_w3_g64": ("GPTQModifier", dict(bits=3, group=64, block_size=128, dampening_frac=0.01)),
    "rtn_w4_g64": ("QuantizationModifier", dict(bits=4, group=64)),
    "rtn_w4_ch": ("QuantizationModifier", dict(bits=4, group=-1)),
    "rtn_w8_ch": ("QuantizationModifier", dict(bits=8, group=-1)),
    "wanda_50": ("WandaPruningModifier", dict(sparsity=0.5, mask_structure="0:0")),
    "sparsegpt_50": ("SparseGPTModifier", dict(sparsity=0.5, mask_structure="0:0", block_size=128, dampening_frac=0.01)),
    "sparsegpt_2of4": ("SparseGPTModifier", dict(sparsity=0.5, mask_structure="2:4", block_size=128, dampening_frac=0.01)),
    "wanda_2of4": ("WandaPruningModifier", dict(sparsity=0.5, mask_structure="2:4")),
    # AWQ (its transform modifier, then the quantizer), asymmetric w4 g64: AWQ's usual scheme
    "rtn_w4_g64_asym": ("QuantizationModifier", dict(bits=4, group=64, sym=False)),
    "gptq_w4_g64_asym": ("GPTQModifier", dict(bits=4, group=64, sym=False, block_size=128, dampening_frac=0.01)),
    "awq_rtn_w4_g64_asym": ("AWQ+QuantizationModifier", dict(bits=4, group=64, sym=False)),
    "awq_gptq_w4_g64_asym": ("AWQ+GPTQModifier", dict(bits=4, group=64, sym=False, block_size=128,
                                                        dampening_frac=0.01)),
    # activation quantization (issue 21): the peer's preset schemes (compressed-tensors' W8A8: int8 per-channel
    # weights, int8 dynamic per-token activations; FP8_DYNAMIC: FP8 per-channel weights, FP8 dynamic per-token
    # activations), SmoothQuant with its default mappings (norm -> q/k/v, norm -> gate/up) and strength 0.5
    "w8a8_rtn": ("QuantizationModifier", dict(scheme="W8A8")),
    "w8a8_gptq": ("GPTQModifier", dict(scheme="W8A8", block_size=128, dampening_frac=0.01)),
    "w8a8_sq_gptq": ("SQ+GPTQModifier", dict(scheme="W8A8", block_size=128, dampening_frac=0.01)),
    "w8a8_sq_rtn": ("SQ+QuantizationModifier", dict(scheme="W8A8")),
    "fp8_dynamic_rtn": ("QuantizationModifier", dict(scheme="FP8_DYNAMIC")),
    "fp8_dynamic_gptq": ("GPTQModifier", dict(scheme="FP8_DYNAMIC", block_size=128, dampening_frac=0.01)),
}


@torch.no_grad()
def activation_check(model, ids):
    """The logits of ``model`` (after oneshot) against the same weights with the input-activation quantization
    disabled: a difference means the activations are quantized in its forward, as they would be served."""
    from compressed_tensors.quantization import QuantizationStatus

    a = model(ids).logits
    saved = {}
    for n, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is not None and scheme.input_activations is not None:
            saved[n] = scheme.input_activations
            scheme.input_activations = None
    b = model(ids).logits
    for n, v in saved.items():
        model.get_submodule(n).quantization_scheme.input_activations = v
    status = {str(getattr(m, "quantization_status", None)) for m in model.modules() if hasattr(m, "quantization_status")}
    return {"act_quant_modules": len(saved), "act_quant_logits_diff": float((a - b).abs().max()),
            "quantization_status": sorted(status)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="wanda_50,sparsegpt_50,sparsegpt_2of4")
    ap.add_argument("--out", default="benchmarks/results/peer_llmcompressor_p1.json")
    ap.add_argument("--no-pin-memory", action="store_true",
                    help="make torch.Tensor.pin_memory return the tensor itself: llm-compressor 0.14's AWQ pins its "
                         "intermediates cache, which stops a CPU-only machine with 'Cannot access accelerator device' "
                         "(a harness change only; nothing is computed differently)")
    args = ap.parse_args(argv)
    if args.no_pin_memory:
        torch.Tensor.pin_memory = lambda self, *a, **k: self

    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    classes = {"WandaPruningModifier": WandaPruningModifier, "SparseGPTModifier": SparseGPTModifier,
               "GPTQModifier": GPTQModifier, "QuantizationModifier": QuantizationModifier}

    def quant_modifier(cls, bits, group, sym=True, **kw):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        args = (QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel") if group == -1 else
                QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group))
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        return classes[cls](config_groups={"group_0": scheme}, ignore=["lm_head"], **kw)
    path = embedded_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)

    def fresh():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    model = fresh()
    ids, calib_info = load_calibration(tok, "wikitext2", 32, 512, 0)
    fwd = yardstick(model, ids)
    dense_ppl = perplexity(model, tok, progress=False)["ppl"]
    print(f"dense forward over {ids.numel()} calibration tokens: {fwd:.1f}s; dense ppl {dense_ppl:.3f}", flush=True)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    out = {"peer": "llmcompressor", "llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
           "protocol": "P1", "calibration": calib_info, "dense_forward_seconds": fwd, "dense_ppl": dense_ppl, "rows": []}
    for name in [n for n in args.only.split(",") if n]:
        cls, kw = CONFIGS[name]
        model = fresh()
        if cls.startswith("AWQ+"):  # AWQ's scales (its default mappings, duo scaling, 20 grid points), then the quantizer
            modifier = [AWQModifier(duo_scaling=True, n_grid=20), quant_modifier(cls[4:], **kw)]
        elif "scheme" in kw:  # a preset scheme, optionally after SmoothQuant (strength 0.5, default mappings)
            base = cls[3:] if cls.startswith("SQ+") else cls
            modifier = ([SmoothQuantModifier(smoothing_strength=0.5)] if cls.startswith("SQ+") else []) + [
                classes[base](targets=["Linear"], ignore=["lm_head"], **kw)]
        elif "bits" in kw:
            modifier = [quant_modifier(cls, **kw)]
        else:
            modifier = [classes[cls](targets=["Linear"], ignore=["re:.*lm_head"], **kw)]
        t0 = time.perf_counter()
        oneshot(model=model, tokenizer=tok, dataset=ds, recipe=modifier, num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], pipeline="sequential", shuffle_calibration_samples=False)
        secs = time.perf_counter() - t0
        ppl = perplexity(model, tok, progress=False)["ppl"]
        extra = {}
        if "scheme" in kw:  # is the activation quantization really applied in this in-memory model's forward?
            extra = activation_check(model, ids[:1, :128])
        nm_ok = None
        if kw.get("mask_structure") == "2:4":
            nm_ok = all(check_nm(m.weight, 2, 4) for n_, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and "lm_head" not in n_)
        row = {"name": name, "ppl": ppl, "seconds": secs, "x_dense_forward": secs / fwd, "nm_exact": nm_ok, **extra}
        if "bits" not in kw and "scheme" not in kw:  # pruning rows (FP8 weights cannot be counted by torch)
            row["sparsity"] = size_metrics(model)["sparsity"]
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        write(args.out, out)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())

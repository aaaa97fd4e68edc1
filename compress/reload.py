"""Reload a saved checkpoint the way a user would: stock ``AutoModelForCausalLM.from_pretrained`` in a fresh
process that imports only torch and transformers (never compress), and compare it with what the run
recorded in memory.

* :func:`verify_saved` (every save, by default): the weights' fingerprint (sha256 over the float32 weights
  every block linear computes with, :func:`compress.core.modules.weights_fingerprint`) and the zero count
  of every module must be equal after the reload. A checkpoint too large for this machine's free memory is
  checked on the meta device instead: its config and weight index are read and the model class is
  built and initialised exactly as ``from_pretrained`` does, without reading a weight.
* :func:`reload_check` (``compress reload-check DIR``): the same for a finished run, plus the perplexity under
  the run's own eval protocol (within 1e-4 relative) and, for structured runs, the logits on the probe the
  run saved beside its model (within 1e-5).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

from compress.core.memory import free_memory_bytes
from compress.data import load_text, tokenize

CHILD = r"""
import hashlib, json, math, sys
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

model_dir, job = sys.argv[1], json.load(open(sys.argv[2]))
assert not any(m == "compress" or m.startswith("compress.") for m in sys.modules)
out = {"transformers": transformers.__version__}
if job.get("meta"):  # too large to load here: build the class, swap in the quantizer's modules and run the
    # modeling code's own weight initialisation on every module, all on the meta device, as from_pretrained does
    import glob, os
    cfg = AutoConfig.from_pretrained(model_dir)
    qc = getattr(cfg, "quantization_config", None)
    hq = None
    if qc is not None:
        from transformers.quantizers import AutoHfQuantizer
        hq = AutoHfQuantizer.from_config(qc, pre_quantized=True)
        hq.validate_environment(device_map={"": "cpu"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        if hq is not None:
            hq.preprocess_model(model=model, dtype=torch.float32, device_map={"": "cpu"},
                                checkpoint_files=sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))))
        model.initialize_weights()
    print(json.dumps(dict(out, mode="meta", **{"class": type(model).__name__})))
    sys.exit(0)
if job.get("loader"):  # a format stock from_pretrained refuses by design (non-uniform widths): its own loader
    import importlib
    mod, fn = job["loader"].split(":")
    model = getattr(importlib.import_module(mod), fn)(model_dir)
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    assert not any(m == "compress" or m.startswith("compress.") for m in sys.modules)
model.eval()
def weight(mod):  # the float weight the module computes with (bitsandbytes dequantized)
    w = mod.weight
    if type(mod).__name__ == "Linear4bit":
        import bitsandbytes as bnb
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if type(mod).__name__ == "Linear8bitLt":
        cb, scb = getattr(w, "CB", None), getattr(w, "SCB", None)
        if cb is None:
            cb, scb = w.data, mod.state.SCB
        return cb.float() * scb.float().unsqueeze(1) / 127.0
    return w.float()

if job["warmup"]:  # compressed-tensors decompresses the packed weights at the first forward
    with torch.no_grad():
        model(input_ids=torch.tensor([[0, 1]]), use_cache=False)
h, zeros = hashlib.sha256(), {}  # bitsandbytes: before any forward (on CPU it repacks 4-bit layers at the first)
with torch.no_grad():
    for name in job["modules"]:
        w = weight(model.get_submodule(name)).contiguous().cpu() + 0.0  # -0.0 -> +0.0, as the run hashed it
        h.update(name.encode()); h.update(w.numpy().tobytes())
        zeros[name] = int(w.numel() - torch.count_nonzero(w))
out.update(mode="load", sha256=h.hexdigest(), zeros=zeros, **{"class": type(model).__name__})
if job.get("ids"):
    ids = torch.tensor(job["ids"], dtype=torch.long).view(-1, job["seqlen"])
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in ids:  # the run's protocol: non-overlapping windows, per-window sums in float64
            logits = model(input_ids=w[None], use_cache=False).logits[0, :-1]
            nll += float(F.cross_entropy(logits.float(), w[1:], reduction="sum").double())
            count += w.numel() - 1
    out["ppl"] = math.exp(nll / count)
if job.get("probe"):  # logits of the in-memory model on fixed ids, saved by the run
    from safetensors.torch import load_file
    pr = load_file(job["probe"])
    with torch.no_grad():
        got = model(input_ids=pr["ids"], use_cache=False).logits[:, -pr["logits"].shape[1]:].float()
    out["probe_logits_max_abs_diff"] = float((got - pr["logits"]).abs().max())
print(json.dumps(out))
"""


def _quant_method(model_dir: Path) -> Optional[str]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("quant_method")


def _child(model_dir: Path, job: Dict, timeout: float = 1800) -> Dict:
    """Run the reload in a fresh interpreter (working directory outside any checkout, so that ``compress``
    cannot be imported by accident); ``{"error": ...}`` when it fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), f.name], capture_output=True, text=True,
                           cwd=tempfile.gettempdir(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"the reload did not finish within {timeout:.0f} s"}
    finally:
        Path(f.name).unlink(missing_ok=True)
    if p.returncode:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit status {p.returncode}", "stderr_tail": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fits_in_memory(model_dir: Path, factor: Optional[float] = None, budget: float = 0.5) -> bool:
    """A full reload here fits: ``factor`` x the checkpoint's bytes within ``budget`` of the free host memory.
    Default factor: 3 for a quantized checkpoint (packed weights decompress to floats), else 1.2 (the floats
    are read as they are stored)."""
    if factor is None:
        factor = 3.0 if _quant_method(Path(model_dir)) else 1.2
    size = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    free = free_memory_bytes("cpu")
    return free is None or size * factor <= budget * free


STOCK = "transformers.AutoModelForCausalLM.from_pretrained"


def verify_saved(model_dir, fingerprint: Dict, force_meta: bool = False, loader: Optional[str] = None) -> Dict:
    """Reload ``model_dir`` in a fresh process and compare the fingerprint (see the module docstring).
    ``loader`` (``"module:function"``): a checkpoint stock ``from_pretrained`` refuses by design is reloaded
    with it instead (recorded). Returns ``{"ok", "mode", ...}`` with ``error`` naming the cause when it fails."""
    model_dir = Path(model_dir)
    meta = (force_meta or not fits_in_memory(model_dir)) and loader is None
    job = {"modules": fingerprint["modules"], "warmup": _quant_method(model_dir) == "compressed-tensors", "meta": meta,
           "loader": loader}
    got = _child(model_dir, job)
    if "error" in got:
        return {"ok": False, "verified": True, "mode": "meta" if meta else "load", "error": got["error"],
                "stderr_tail": got.get("stderr_tail")}
    if meta:
        return {"ok": True, "verified": True, "mode": "meta", "class": got["class"],
                "note": "too large to reload here: built and initialised on the meta device, weights not compared"}
    ok = got["sha256"] == fingerprint["sha256"] and got["zeros"] == fingerprint["zeros"]
    out = {"ok": ok, "verified": True, "mode": "load", "class": got["class"], "weights_equal": got["sha256"] == fingerprint["sha256"],
           "zeros_equal": got["zeros"] == fingerprint["zeros"], "modules": len(fingerprint["modules"]),
           "loader": loader or STOCK}
    if not ok:
        out["error"] = "the reloaded weights differ from the saved ones (fingerprint or zero counts)"
    return out


def reload_check(run_dir) -> Dict:
    """``compress reload-check DIR``: a finished run's saved model reloaded with stock ``from_pretrained`` in a
    fresh process: weights fingerprint, zero counts, perplexity under the run's protocol, probe logits
    (structured runs), and the sizes in config.json. Writes ``DIR/reload_check.json``."""
    run = Path(run_dir)
    res = json.loads((run / "results.json").read_text())
    save = next((s for s in res["stages"] if s["name"] == "save"), None)
    if save is None or not (run / "model").exists():
        raise FileNotFoundError(f"{run} has no saved model (run with output.save_model=true)")
    fp = save["fingerprint"]
    ppl_key = next(iter(res["metrics"]["ppl"]))
    ppl = res["metrics"]["ppl"][ppl_key]
    proto = res.get("protocol", {}).get(ppl_key, {})
    ev = res["config"]["eval"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "model")
    ids = tokenize(tok, load_text(proto.get("source", ppl_key), role="eval"))
    bos = [tok.bos_token_id] if ev.get("add_bos") else []
    nwin = min(ids.numel() // ev["seqlen"], ev["max_windows"] or 10**9)
    if bos:
        raise ValueError("eval.add_bos=true runs are not handled by reload-check")
    # a checkpoint stock from_pretrained refuses by design (non-uniform widths) is reloaded with the loader the
    # save step verified it with, and the answer says which
    loader = (save.get("reload") or {}).get("loader")
    loader = None if loader in (None, STOCK) else loader
    job = {"ids": ids[: nwin * ev["seqlen"]].tolist(), "seqlen": ev["seqlen"], "modules": fp["modules"],
           "loader": loader, "warmup": _quant_method(run / "model") == "compressed-tensors",
           "probe": str(run / "probe_logits.safetensors") if (run / "probe_logits.safetensors").exists() else None}
    got = _child(run / "model", job)
    if "error" in got:
        out = {"run": str(run), "ok": False, "error": got["error"]}
    else:
        config = json.loads((run / "model" / "config.json").read_text())
        out = {"run": str(run), "model_class": got["class"], "loader": loader or STOCK,
               "weights_equal": got["sha256"] == fp["sha256"],
               "modules": len(fp["modules"]), "zeros_equal": got["zeros"] == fp["zeros"],
               "zeros": sum(fp["zeros"].values()), "ppl_run": ppl, "ppl_reloaded": got["ppl"],
               "ppl_rel_diff": abs(got["ppl"] - ppl) / ppl, "protocol": proto,
               "probe_logits_max_abs_diff": got.get("probe_logits_max_abs_diff"),
               "config_sizes": {k: v for k, v in config.items()
                                if k in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                                         "num_hidden_layers", "ffn_dim")}}
        out["ok"] = out["weights_equal"] and out["zeros_equal"] and out["ppl_rel_diff"] <= 1e-4 and (
            out["probe_logits_max_abs_diff"] is None or out["probe_logits_max_abs_diff"] <= 1e-5)
    (run / "reload_check.json").write_text(json.dumps(out, indent=1))
    return out

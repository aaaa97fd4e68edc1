"""Reload a saved run's model in a fresh process that imports only torch and transformers (bitsandbytes
through transformers for bnb checkpoints), with stock ``AutoModelForCausalLM.from_pretrained`` on CPU,
and compare with what the run recorded in memory: the weights' fingerprint (sha256 over the float32
weights every selected linear computes with), the zero count of every module, and the perplexity under
the run's own eval protocol (within 1e-4 relative); for structured runs also the logits on the fixed probe
the run saved beside its model (``probe_logits.safetensors``, within 1e-5) and the new sizes in config.json.

    compress prune=sparsegpt prune.sparsity=0.5 quant=gptq output.save_model=true hydra.run.dir=DIR
    python benchmarks/reload_check.py DIR            # writes DIR/reload_check.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import hashlib, json, math, sys
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

assert not any(m == "compress" or m.startswith("compress.") for m in sys.modules)
model_dir, job = sys.argv[1], json.load(open(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
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
        model(input_ids=torch.tensor([job["ids"][:2]]), use_cache=False)
h, zeros = hashlib.sha256(), {}  # bitsandbytes: before any forward (on CPU it repacks 4-bit layers at the first)
with torch.no_grad():
    for name in job["modules"]:
        w = weight(model.get_submodule(name)).contiguous().cpu() + 0.0  # -0.0 -> +0.0, as the run hashed it
        h.update(name.encode()); h.update(w.numpy().tobytes())
        zeros[name] = int(w.numel() - torch.count_nonzero(w))
ids = torch.tensor(job["ids"], dtype=torch.long).view(-1, job["seqlen"])
nll, count = 0.0, 0
with torch.no_grad():
    for w in ids:  # the run's protocol: non-overlapping windows, per-window sums in float64
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1]
        nll += float(F.cross_entropy(logits.float(), w[1:], reduction="sum").double())
        count += w.numel() - 1

probe = None
if job.get("probe"):  # logits of the in-memory model on fixed ids, saved by the run
    from safetensors.torch import load_file
    pr = load_file(job["probe"])
    with torch.no_grad():
        got = model(input_ids=pr["ids"], use_cache=False).logits[:, -pr["logits"].shape[1]:].float()
    probe = float((got - pr["logits"]).abs().max())

print(json.dumps({"probe_logits_max_abs_diff": probe, "ppl": math.exp(nll / count), "sha256": h.hexdigest(), "zeros": zeros,
                  "class": type(model).__name__, "quantization_config": getattr(model.config, "quantization_config", None) is not None}))
"""


def main(argv=None) -> int:
    run = Path((argv or sys.argv[1:])[0])
    res = json.loads((run / "results.json").read_text())
    save = next(s for s in res["stages"] if s["name"] == "save")
    fp = save["fingerprint"]
    ppl_key = next(iter(res["metrics"]["ppl"]))
    ppl = res["metrics"]["ppl"][ppl_key]
    proto = res.get("protocol", {}).get(ppl_key, {})
    cfg = res["config"]["eval"]
    if cfg.get("add_bos"):
        raise SystemExit("eval.add_bos=true runs are not handled by this check")

    from transformers import AutoTokenizer

    from compress.data import load_text, tokenize  # the parent computes the eval tokens the run used

    tok = AutoTokenizer.from_pretrained(run / "model")
    ids = tokenize(tok, load_text(proto.get("source", ppl_key), role="eval"))
    nwin = min(ids.numel() // cfg["seqlen"], cfg["max_windows"] or 10**9)
    qm = (json.loads((run / "model" / "config.json").read_text()).get("quantization_config") or {}).get("quant_method")
    job = {"ids": ids[: nwin * cfg["seqlen"]].tolist(), "seqlen": cfg["seqlen"], "modules": fp["modules"],
           "warmup": qm == "compressed-tensors",
           "probe": str(run / "probe_logits.safetensors") if (run / "probe_logits.safetensors").exists() else None}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    p = subprocess.run([sys.executable, "-c", CHILD, str(run / "model"), f.name], capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    if p.returncode:
        print(p.stderr[-3000:], file=sys.stderr)
        return 1
    got = json.loads(p.stdout.strip().splitlines()[-1])
    out = {"run": str(run), "model_class": got["class"], "weights_equal": got["sha256"] == fp["sha256"],
           "modules": len(fp["modules"]), "zeros_equal": got["zeros"] == fp["zeros"],
           "zeros": sum(fp["zeros"].values()), "ppl_run": ppl, "ppl_reloaded": got["ppl"],
           "ppl_rel_diff": abs(got["ppl"] - ppl) / ppl, "protocol": proto,
           "probe_logits_max_abs_diff": got["probe_logits_max_abs_diff"],
           "config_sizes": {k: v for k, v in json.loads((run / "model" / "config.json").read_text()).items()
                            if k in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                                     "num_hidden_layers", "ffn_dim")}}
    out["ok"] = out["weights_equal"] and out["zeros_equal"] and out["ppl_rel_diff"] <= 1e-4 and (
        got["probe_logits_max_abs_diff"] is None or got["probe_logits_max_abs_diff"] <= 1e-5)
    (run / "reload_check.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Why RTN loses with a rotation on the embedded model, part 3: the residual stream's massive channels.

SmolLM2's residual stream has a few channels far larger than the rest (channel 507 reaches ~25,000 against a
median channel peak of ~87), and the norms that feed the readers give them weights near zero (0.0003 and
-0.0001 in blocks 1 and 15): the readers ignore them. Unrotated, a reader's rounding error on such a column is
multiplied by that ~0 weight. Rotated, the normalised input ``x / rms(x)`` of a token dominated by a massive
channel is spread over every channel, so the whole row's rounding error reaches the output.

1. Per token, for q (attention input) and up (MLP input) of a few blocks, from the float model's normalised
   inputs: the relative output error ``||(RTN(W') - W') u|| / ||W' u||`` of RTN w4 g64 symmetric, unrotated
   (``W' = W diag(g)``, ``u = x/rms(x)``) and rotated (``W' Q``, ``u Q``), for the 8 tokens with the largest
   ``max|u| / rms(u)`` and for the rest.
2. The rotation with the ``K`` largest channels left out (``Q = I`` on them, a randomized Hadamard or random
   orthogonal matrix on the others), RTN w4 g64 W4A8 / W4A16, ppl under P1's evaluation (40 x 512).

    python benchmarks/rotation_massive_channels.py --keep 1,8,32,96 --out benchmarks/results/rotation_massive_channels.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from common import write

import compress.transforms.rotation as rot_module
from compress.config import make_config, quant_config
from compress.core.grid import GridSpec, rtn
from compress.core.hadamard import rotation
from compress.data import load_calibration
from compress.evaluate import perplexity
from compress.models import load_model
from compress.schema import ModelConfig
from compress.stages.quant import quantize_model


W4_G64 = GridSpec(4, True, 64)  # the quant stage's grid for quant_config("rtn", scheme=..., group_size=64)


def rtn_w4_g64(w):
    return rtn(w, W4_G64)[0]


@torch.no_grad()
def per_token(model, ids, hidden) -> dict:
    layers = model.model.layers
    caps, handles = {}, []

    def hook(name):
        def f(mod, args):
            x = args[0].float()
            caps[name] = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)).reshape(-1, hidden)
        return f

    for i in (1, 5, 15, 29):
        handles.append(layers[i].input_layernorm.register_forward_pre_hook(hook(f"{i}.q")))
        handles.append(layers[i].post_attention_layernorm.register_forward_pre_hook(hook(f"{i}.up")))
    model(ids)
    for h in handles:
        h.remove()
    q = rotation(hidden, 0)[0].float()
    out = {}
    for key, u in caps.items():
        i, part = key.split(".")
        layer = layers[int(i)]
        norm, lin = ((layer.input_layernorm, layer.self_attn.q_proj) if part == "q"
                     else (layer.post_attention_layernorm, layer.mlp.up_proj))
        wg = lin.weight.float() * norm.weight.float()
        y = u @ wg.T
        plain = (u @ (rtn_w4_g64(wg) - wg).T).norm(dim=1) / y.norm(dim=1)
        wr = wg @ q
        rotated = ((u @ q) @ (rtn_w4_g64(wr) - wr).T).norm(dim=1) / y.norm(dim=1)
        peak = u.abs().amax(1) / u.pow(2).mean(1).sqrt()
        top = peak.topk(8).indices
        rest = torch.ones(len(peak), dtype=torch.bool)
        rest[top] = False
        out[key] = {"peak_ratio_top8": round(float(peak[top].mean()), 1), "peak_ratio_median": round(float(peak.median()), 1),
                    "rel_error_top8": {"plain": round(float(plain[top].mean()), 4), "rotated": round(float(rotated[top].mean()), 4)},
                    "rel_error_rest": {"plain": round(float(plain[rest].mean()), 4), "rotated": round(float(rotated[rest].mean()), 4)}}
        print(key, json.dumps(out[key]), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", default="1,8,32,96")
    ap.add_argument("--out", default="benchmarks/results/rotation_massive_channels.json")
    args = ap.parse_args(argv)
    m0, tok = load_model(ModelConfig(device="cpu"))
    ids = load_calibration(tok, "wikitext2", 4, 512, 0)[0]
    hidden = m0.config.hidden_size
    with torch.no_grad():
        hs = m0(ids, output_hidden_states=True).hidden_states
    peaks = torch.stack([h.abs().amax((0, 1)) for h in hs[1:]]).amax(0)
    order = peaks.argsort(descending=True)
    out = {"quantizer": "rtn w4 g64 symmetric", "channel_peaks_top8": {int(c): round(float(peaks[c]), 1) for c in order[:8]},
           "channel_peak_median": round(float(peaks.median()), 1),
           "norm_weight_at_top4": {f"block {i}": [round(float(m0.model.layers[i].post_attention_layernorm.weight[c]), 4)
                                                  for c in order[:4]] for i in (1, 15, 29)},
           "per_token": per_token(m0, ids, hidden), "keep": {}}
    write(args.out, out)
    for k in [int(v) for v in args.keep.split(",") if v]:
        keep = order[:k]

        def keeping(n, seed=0, kind="hadamard", keep=keep):
            rest = torch.tensor([c for c in range(n) if c not in set(keep.tolist())])
            q_rest, how = rotation(len(rest), seed, kind)
            q = torch.zeros(n, n, dtype=torch.float64)
            q[keep, keep] = 1.0
            q[rest.unsqueeze(1), rest.unsqueeze(0)] = q_rest
            return q, f"{k} largest channels kept, {how}"

        rot_module.rotation = keeping
        row = {}
        for scheme in ("w4a8", "w4a16"):
            m, rep = quantize_model(copy.deepcopy(m0), tok, quant_config("rtn", scheme=scheme, group_size=64),
                                    transforms=[make_config("transform", "rotation")], progress=False)
            row[scheme] = perplexity(m, tok, "wikitext2", 512, 40, progress=False)["ppl"]
            row["rotation"], row["logits_rel_diff"] = (rep.prepared["rotation"]["rotation"],
                                                       rep.prepared["rotation"]["logits_rel_diff"])
        out["keep"][k] = row
        print(k, json.dumps(row), flush=True)
        write(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

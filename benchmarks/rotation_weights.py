"""Why a rotation helps GPTQ but not RTN on the embedded model, measured on the weights alone (no forward).

For every block linear of the default model: the relative error ||RTN(W) - W|| / ||W|| of a w4 g64 symmetric
round to nearest, and the mean ratio max|w| / rms(w) over its 64-column groups (what sets the step of a
symmetric group grid: a smaller ratio means a finer grid relative to the weights), for

* the weights as loaded;
* the weights with the norms folded in (``W diag(g)``, what the rotation does first), unrotated;
* the rotated weights (``transform=rotation``, as the quant stage gets them);
* the loaded weights plus Gaussian noise of 10% of each row's rms, as a control for "continuous" weights.

The embedded SmolLM2's weights were Q4_1 (asymmetric 4-bit, groups of 32) before dequantization: each group
of 32 holds at most 16 distinct values spread evenly over its range, a flat distribution with a small
max/rms ratio. A rotation turns every row into sums of many weights (Gaussian-like, a larger ratio).

    python benchmarks/rotation_weights.py --out benchmarks/results/rotation_weights.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from common import write

from compress.calibration.targets import resolve_targets
from compress.core.grid import GridSpec, rtn
from compress.models import load_model
from compress.registry import make_config
from compress.schema import ModelConfig
from compress.transforms.rotation import Rotation


def stats(weights, spec):
    errs, ratios, distinct = [], [], []
    for w in weights:
        w = w.float()
        deq = rtn(w, spec)[0]
        errs.append(float((deq - w).norm() / w.norm()))
        g = w.reshape(w.shape[0], -1, 64)
        ratios.append(float((g.abs().amax(-1) / g.square().mean(-1).sqrt().clamp_min(1e-12)).mean()))
        g32 = w[:64].reshape(64, -1, 32)
        distinct.append(sum(len(torch.unique(x)) for x in g32.reshape(-1, 32)[:200]) / min(200, g32.reshape(-1, 32).shape[0]))
    n = len(errs)
    return {"rtn_w4_g64_rel_error": sum(errs) / n, "max_over_rms_g64": sum(ratios) / n,
            "distinct_values_per_32": sum(distinct) / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/rotation_weights.json")
    args = ap.parse_args(argv)
    spec = GridSpec(4, True, 64)
    model, _ = load_model(ModelConfig(device="cpu"))
    names = resolve_targets(model).qualified_names()
    out = {"spec": "rtn w4 g64 symmetric", "linears": len(names)}
    out["loaded"] = stats([model.get_submodule(n).weight.detach() for n in names], spec)
    g = torch.Generator().manual_seed(0)
    noisy = []
    for n in names:
        w = model.get_submodule(n).weight.detach().float()
        noisy.append(w + 0.1 * w.square().mean(1, keepdim=True).sqrt() * torch.randn(w.shape, generator=g))
    out["loaded_plus_noise_10pct"] = stats(noisy, spec)
    rot = copy.deepcopy(model)
    info = Rotation(make_config("transform", "rotation")).prepare(rot)
    out["rotated"] = stats([rot.get_submodule(n).weight.detach() for n in names], spec)
    folded = copy.deepcopy(model)  # the fold alone: the identity as the rotation
    import compress.transforms.rotation as R  # noqa: E402  (a benchmark: patched to fold without rotating)
    keep = R.rotation
    R.rotation = lambda n, seed, kind: (torch.eye(n, dtype=torch.float64), "identity")
    try:
        Rotation(make_config("transform", "rotation", rotate_v=False)).prepare(folded)
    finally:
        R.rotation = keep
    out["folded_unrotated"] = stats([folded.get_submodule(n).weight.detach() for n in names], spec)
    out["rotation"] = info["rotation"]
    print(json.dumps(out, indent=1))
    write(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a rotation costs RTN its accuracy on the embedded model: RTN w4 g64 symmetric on the readers of the
residual stream only (q, k, v, gate, up), on the writers only (o, down), and on down only, with and without
``transform=rotation``; ppl under P1's evaluation (40 x 512 of wiki.test.raw).

    python benchmarks/rotation_readers_writers.py --out benchmarks/results/rotation_readers_writers.json
"""

from __future__ import annotations

import argparse
import copy
import json

from common import write

from compress.config import make_config, quant_config
from compress.evaluate import perplexity
from compress.models import load_model
from compress.schema import ModelConfig
from compress.stages.quant import quantize_model

SETS = {"readers": [r".*(q|k|v|gate|up)_proj"], "writers": [r".*(o|down)_proj"], "down": [r".*down_proj"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/rotation_readers_writers.json")
    args = ap.parse_args(argv)
    m0, tok = load_model(ModelConfig(device="cpu"))
    out = {"quantizer": "rtn w4 g64 symmetric", "ppl": {}}
    for rot in (False, True):
        for name, targets in SETS.items():
            m = copy.deepcopy(m0)
            tf = [make_config("transform", "rotation")] if rot else []
            m, _ = quantize_model(m, tok, quant_config("rtn", bits=4, group_size=64, targets=targets), transforms=tf,
                                  progress=False)
            key = f"{'rotated' if rot else 'plain'} {name}"
            out["ppl"][key] = perplexity(m, tok, "wikitext2", 512, 40, progress=False)["ppl"]
            print(key, out["ppl"][key], flush=True)
            write(args.out, out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Markdown tables from quant_bench.py / peer_llmcompressor.py result files (what BENCHMARKS.md shows).

    python benchmarks/quant_table.py benchmarks/results/quant_p1.json [more.json ...] [--peer peer.json]
"""

import argparse
import json


def fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def total(r):
    """Prune + quant seconds: a one-pass row's quant seconds already hold its prune stage."""
    if r.get("prune_seconds") is None:
        return None
    return r["quant_seconds"] if r.get("mode") == "joint" else r["prune_seconds"] + r["quant_seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--peer", default=None)
    args = ap.parse_args()
    dense = None
    print("| setting | ppl | ppl after prune | bits / weight | packed MiB (fp32 MiB) | quant s | × dense fwd "
          "| prune + quant s | peak RSS MiB | checks |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for f in args.files:
        d = json.load(open(f))
        for r in d["rows"]:
            if r["name"] == "dense":
                dense = r["ppl"]
            checks = []
            if r.get("check_ok") is not None:
                checks.append("zeros/grid ok" if r["check_ok"] else "CHECK FAILED")
            if r.get("nm_exact") is not None:
                checks.append("2:4 exact" if r["nm_exact"] else "2:4 BROKEN")
            if r.get("sparsity") is not None:
                checks.append(f"sparsity {r['sparsity']:.4f}")
            if "reload_ok" in r:
                checks.append("reload: weights, zeros" + (", 2:4" if r.get("reload_nm_exact") else "") + " equal"
                              if r["reload_ok"] else "RELOAD MISMATCH")
            name = r["name"] + (" ⚑" if r.get("flag") else "")
            fp = (f"{r['footprint_packed_mb']:.0f} ({r['footprint_fp32_mb']:.0f})" if r.get("footprint_fp32_mb")
                  else fmt(r.get("footprint_packed_mb"), "{:.0f}"))
            print(f"| {name} | {fmt(r['ppl'])} | {fmt(r.get('ppl_pruned'))} | {fmt(r.get('bits_per_weight_quantized'), '{:.3f}')} "
                  f"| {fp} | {fmt(r.get('quant_seconds'), '{:.1f}')} | {fmt(r.get('x_dense_forward'))} "
                  f"| {fmt(total(r), '{:.1f}')} "
                  f"| {fmt(r.get('peak_rss_mb'), '{:.0f}')} | {'; '.join(checks)} |")
    if args.peer:
        d = json.load(open(args.peer))
        print(f"\npeer (llm-compressor), dense forward {d.get('dense_forward_seconds', 0):.1f} s:\n")
        print("| setting | ppl | seconds | × dense fwd |")
        print("| --- | --- | --- | --- |")
        for r in d["rows"]:
            print(f"| {r['name']} | {fmt(r['ppl'])} | {fmt(r['seconds'], '{:.1f}')} | {fmt(r['x_dense_forward'])} |")


if __name__ == "__main__":
    main()

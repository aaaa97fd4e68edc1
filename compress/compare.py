"""``compress compare DIR [DIR ...]``: collect every ``results.json`` under the given directories into a
tidy CSV, a Markdown table and plots.

Runs whose evaluation protocols differ are not put in one table unless ``--mixed-protocols`` is given:
perplexities measured on different windows or texts are not comparable.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from compress.config import label as method_label

COLUMNS = ["recipe", "method", "pattern", "sparsity_target", "sparsity", "quant", "bits", "activations", "transforms",
           "bits_per_weight", "footprint_packed_mb",
           "ppl", "delta_vs_dense", "dense", "params_total", "structure", "removed_ratio", "flops_per_token",
           "flop_ceiling", "prefill_speedup", "decode_speedup",
           "params_nonzero", "footprint_mb", "footprint_sparse_mb", "tokens_per_s", "sparse24_tokens_per_s",
           "prune_seconds", "train_seconds", "quant_seconds", "peak_memory_mb", "status", "protocol",
           "zero_shot_protocol", "code_version", "run_dir"]  # then one column per zero-shot metric and task, e.g. acc:hellaswag


ZERO_SHOT_METRICS = ("acc", "acc_norm")


def zero_shot_columns(rows: List[Dict]) -> List[str]:
    return sorted({k for r in rows for k in r if k.split(":")[0] in ZERO_SHOT_METRICS and ":" in k})


def _protocol_key(data: Dict) -> str:
    parts = []
    for ds, p in sorted((data.get("protocol") or {}).items()):
        if isinstance(p, dict) and "seqlen" in p and "windows" in p:
            parts.append(f"{ds}:{p.get('sha256', '')[:8]}:{p['seqlen']}x{p['windows']}:bos={p.get('bos')}")
    return ";".join(parts)


def _zero_shot_key(data: Dict) -> Optional[str]:
    z = (data.get("protocol") or {}).get("zero_shot")
    if not z:
        return None
    return f"lm_eval {z.get('lm_eval_version')}, {z.get('num_fewshot')}-shot, limit {z.get('limit')}"


def load_runs(dirs: List[str]) -> List[Dict]:
    runs = []
    for d in dirs:
        for path in sorted(Path(d).rglob("results.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                print(f"compress compare: skipping {path}: {e}", file=sys.stderr)
                continue
            data["_dir"] = str(path.parent)
            runs.append(data)
    return runs


def rows_from_runs(runs: List[Dict], dataset: Optional[str] = None) -> List[Dict]:
    rows = []
    for data in runs:
        cfg = data.get("config") or {}
        prune = cfg.get("prune") or {}
        quant = cfg.get("quant") or {}
        m = data.get("metrics") or {}
        ppl = m.get("ppl") or {}
        ds = dataset or (next(iter(ppl)) if ppl else None)
        stages = {s["name"]: s for s in data.get("stages", [])}
        method = prune.get("method", "none")
        qm = quant.get("method", "none")
        # the dense baseline: every stage none (a quant-only or train-only run is not dense)
        dense = all((cfg.get(s) or {}).get("method", "none") == "none" for s in ("prune", "train", "quant"))
        qlabel = "-" if qm == "none" else method_label("quant", quant)
        if qlabel != "-" and (cfg.get("transform") or {}).get("method", "none") != "none":
            qlabel = f"{method_label('transform', cfg['transform'])} + {qlabel}"
        masker = prune if method != "none" else quant if "sparsity" in quant else {}  # who chose the zeros
        mlabel = masker.get("method", "none") if masker else "none"
        st = data.get("structured") or {}
        sp = m.get("speed") or {}
        qsum = (data.get("quant_report") or {}).get("summary") or {}
        rows.append({
            "structure": f"{st.get('importance')} {st.get('achieved_ratio', 0):.3f}" if st else "-",
            "flops_per_token": (st.get("flops_per_token_after") or {}).get("total") or m.get("flops_per_token"),
            "flop_ceiling": st.get("flop_ratio_ceiling"),
            "removed_ratio": st.get("achieved_ratio"),
            "prefill_speedup": (sp.get("speedup") or {}).get(f"prefill_b{sp.get('batch_size')}"),
            "decode_speedup": (sp.get("speedup") or {}).get("decode_b1"),
            "recipe": data.get("recipe") or ("dense" if dense else "+".join(
                x for x in (method if method != "none" else "", (cfg.get("train") or {}).get("method", "none")
                            if (cfg.get("train") or {}).get("method", "none") != "none" else "",
                            qm if qm != "none" else "") if x)),
            "method": "none" if dense else (method if method != "none" else mlabel if masker else "none"),
            "dense": dense,
            "quant": qlabel,
            # W8A8, W4A16, FP8 ...; the activation format ("none": weight-only); transforms (smoothquant, rotation)
            "bits": qsum.get("bits_label") or (f"W{quant.get('bits')}A16" if qm != "none" and quant.get("bits") else None),
            "activations": qsum.get("activations") or ("none" if qm != "none" else None),
            "transforms": "+".join(qsum.get("transforms") or []) or None,
            "bits_per_weight": m.get("bits_per_weight"),
            "footprint_packed_mb": m.get("footprint_packed_mb"),
            "pattern": (masker.get("pattern", "") if method != "structured" else prune.get("importance", ""))
            if masker else "",
            "sparsity_target": (masker.get("sparsity") if method != "structured" else prune.get("ratio"))
            if masker else 0.0,
            "sparsity": m.get("sparsity"),
            "ppl": ppl.get(ds) if ds else None,
            "params_total": m.get("params_total"),
            "params_nonzero": m.get("params_nonzero"),
            "footprint_mb": m.get("footprint_mb"),
            "footprint_sparse_mb": m.get("footprint_sparse_mb"),
            "tokens_per_s": (m.get("speed") or {}).get("tokens_per_s"),
            "sparse24_tokens_per_s": (m.get("speed") or {}).get("sparse24_tokens_per_s"),
            **{f"{metric}:{task}": v for task, vals in (m.get("zero_shot") or {}).items()
               for metric, v in vals.items() if metric in ZERO_SHOT_METRICS},
            "prune_seconds": (stages.get("prune") or {}).get("seconds"),
            "train_seconds": (stages.get("train") or {}).get("seconds"),
            "quant_seconds": (stages.get("quant") or {}).get("seconds"),
            "peak_memory_mb": max((s.get("peak_memory_mb") or 0) for s in stages.values()) if stages else None,
            "status": data.get("status"),
            "protocol": _protocol_key(data),
            "zero_shot_protocol": _zero_shot_key(data),
            "code_version": data.get("code_version") or (data.get("environment") or {}).get("compress"),
            "run_dir": data["_dir"],
        })
    dense = [r["ppl"] for r in rows if r["dense"] and r["ppl"]]
    for r in rows:
        r["delta_vs_dense"] = (r["ppl"] - dense[0]) if dense and r["ppl"] is not None else None
    rows.sort(key=lambda r: (not r["dense"], r["method"], r["pattern"], r["sparsity_target"] or 0, r["quant"],
                             r["bits_per_weight"] or 0, r["recipe"]))
    return rows


def markdown_table(rows: List[Dict]) -> str:
    zs = zero_shot_columns(rows)
    speed = any(r.get("tokens_per_s") for r in rows)
    sparse24 = any(r.get("sparse24_tokens_per_s") for r in rows)
    quant = any(r.get("quant") not in (None, "-") for r in rows)
    structured = any(r.get("structure") not in (None, "-") for r in rows)
    head = (["recipe", "method", "pattern", "sparsity"]
            + (["removed (structured)", "params", "MFLOPs/token", "FLOP ceiling", "prefill × dense", "decode × dense"]
               if structured else [])
            + (["quant", "bits", "bits/weight", "packed MiB"] if quant else [])
            + ["ppl", "Δ vs dense"] + zs
            + ["non-zero params", "dense MiB", "sparse-storage MiB"] + (["tokens/s"] if speed else [])
            + (["2:4 kernels tokens/s"] if sparse24 else []) + ["prune s", "train s", "peak MiB", "status", "code"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for r in rows:
        cells = [str(r["recipe"]), r["method"], r["pattern"] or "-", f(r["sparsity"], "{:.3f}")]
        if structured:
            cells += [r.get("structure") or "-", f(r.get("params_total"), "{:,}"),
                      f(r["flops_per_token"] / 1e6 if r.get("flops_per_token") else None, "{:.1f}"),
                      f(r.get("flop_ceiling"), "{:.3f}x"), f(r.get("prefill_speedup"), "{:.3f}x"),
                      f(r.get("decode_speedup"), "{:.3f}x")]
        if quant:
            cells += [r.get("quant") or "-", r.get("bits") or "-", f(r.get("bits_per_weight"), "{:.3f}"),
                      f(r.get("footprint_packed_mb"), "{:.0f}")]
        cells += [f(r["ppl"]), f(r["delta_vs_dense"], "{:+.2f}")]
        cells += [f(r.get(c), "{:.4f}") for c in zs]
        cells += [f(r["params_nonzero"], "{:,}"), f(r["footprint_mb"], "{:.0f}"), f(r.get("footprint_sparse_mb"), "{:.0f}")]
        if speed:
            cells.append(f(r.get("tokens_per_s"), "{:,.0f}"))
        if sparse24:
            cells.append(f(r.get("sparse24_tokens_per_s"), "{:,.0f}"))
        cells += [f(r["prune_seconds"], "{:.1f}"), f(r["train_seconds"], "{:.1f}"), f(r["peak_memory_mb"], "{:.0f}"),
                  str(r["status"]), str(r.get("code_version") or "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finish(fig, ax, xlabel: str, title: str, path: Path, legend: int = 0) -> None:
    """Log-scale ppl axis, labels, grid, optional legend; write and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(rows: List[Dict], path: Path, x, xlabel: str, title: str) -> bool:
    """ppl (log) against a cost axis ``x(row)`` (footprint or speed), one labelled point per run; False if no data."""
    pts = [r for r in rows if x(r) and r["ppl"] is not None and r["status"] == "ok"]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in pts:
        label = "dense" if r["dense"] else f"{r['recipe']} {r['sparsity'] or 0:.2f}"
        ax.scatter(x(r), r["ppl"], color="gray" if r["dense"] else None)
        ax.annotate(label, (x(r), r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    _finish(fig, ax, xlabel, title, path)
    return True


def act_kind(row: Dict) -> str:
    """``A16`` (weight-only), ``A8 int8`` or ``A8 fp8``: what the plot separates by marker and line style."""
    a = row.get("activations") or "none"
    return "A16" if a == "none" else "A8 fp8" if a.startswith("fp8") else "A8 int8"


ACT_STYLE = {"A16": ("o", "-"), "A8 int8": ("s", "--"), "A8 fp8": ("^", ":")}


def bits_series(rows: List[Dict]):
    """``({setting: [(bits per weight, ppl, bit width), ...] sorted by bits}, dense ppl)``: a setting is the
    quant label without its bit width (plus the prune method and pattern when the run pruned), prefixed by
    its activation kind (:func:`act_kind`), so that weight-only and 8-bit-activation runs never share a line."""
    import re as _re

    series: Dict[str, List] = {}
    dense = None
    for r in rows:
        if r["ppl"] is None or r["status"] != "ok":
            continue
        if r["dense"]:
            dense = r["ppl"]
        elif r.get("bits_per_weight"):
            key = _re.sub(r" w\d+", "", r["quant"])
            if r["method"] != "none":
                key = f"{r['method']} {r['pattern']} + {key}"
            key = f"[{act_kind(r)}] {key}"
            m = _re.search(r"w(\d+)", r["quant"])
            series.setdefault(key, []).append((r["bits_per_weight"], r["ppl"], int(m.group(1)) if m else None))
    for pts in series.values():
        pts.sort(key=lambda p: p[0])
    return series, dense


def plot_bits(rows: List[Dict], path: Path) -> bool:
    """ppl (log) against bits per weight: one line per quantization setting (method, grouping, grid; with
    the prune method when there is one) across bit widths, the dense model as a gray dashed line; the
    activation scheme is the marker and line style (weight-only: circles, solid; int8 activations:
    squares, dashed; FP8 activations: triangles, dotted). False if no run is quantized."""
    series, dense = bits_series(rows)
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, pts in sorted(series.items()):
        marker, style = ACT_STYLE[key[1:key.index("]")]]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style, label=key)
        for b, ppl, width in pts:
            if width:
                ax.annotate(f"w{width}", (b, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points",
                            color=line.get_color())
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", label=f"dense fp32 ({dense:.2f})")
    _finish(fig, ax, "bits per weight of the quantized linears (scales, zero points included)",
            "perplexity vs bits per weight", path, legend=7)
    return True


def plot(rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: Dict[str, List] = {}
    dense = None
    for r in rows:
        if r["ppl"] is None or r["status"] != "ok":
            continue
        if r["dense"]:
            dense = r["ppl"]
            continue
        if r["method"] == "none":  # quant/train-only runs have no sparsity axis: plotted against bits
            continue
        x = r.get("removed_ratio") if r["method"] == "structured" else r["sparsity"]  # removed, or zeroed
        by_method.setdefault(f"{r['method']} {r['pattern']}", []).append((x, r["ppl"]))
    for label, pts in sorted(by_method.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", label=f"dense ({dense:.2f})")
    _finish(fig, ax, "fraction of block weights zeroed (sparsity) or removed (structured)", "perplexity vs sparsity",
            path, legend=8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="compress compare", description=__doc__)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", default=None, help="output directory (default: the first DIR)")
    ap.add_argument("--dataset", default=None, help="which ppl to compare (default: the first in each run)")
    ap.add_argument("--mixed-protocols", action="store_true", help="allow runs with different eval protocols")
    args = ap.parse_args(argv)
    runs = load_runs(args.dirs)
    if not runs:
        print(f"compress compare: no results.json under {' '.join(args.dirs)}", file=sys.stderr)
        return 1
    rows = rows_from_runs(runs, args.dataset)
    protocols = {r["protocol"] for r in rows if r["ppl"] is not None}
    if len(protocols) > 1 and not args.mixed_protocols:
        print("compress compare: refusing to compare runs with different evaluation protocols:", file=sys.stderr)
        for p in sorted(protocols):
            print(f"  {p}: " + ", ".join(r["run_dir"] for r in rows if r["protocol"] == p), file=sys.stderr)
        print("Their perplexities are not comparable; pass --mixed-protocols to tabulate them anyway.", file=sys.stderr)
        return 2
    zs_protocols = {r["zero_shot_protocol"] for r in rows if r["zero_shot_protocol"]}
    if len(zs_protocols) > 1 and not args.mixed_protocols:
        print("compress compare: refusing to compare zero-shot accuracies measured differently: "
              + " | ".join(sorted(zs_protocols)) + ". Pass --mixed-protocols to tabulate them anyway.", file=sys.stderr)
        return 2
    out = Path(args.out or args.dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + zero_shot_columns(rows), restval="")
        w.writeheader()
        w.writerows(rows)
    md = markdown_table(rows)
    (out / "comparison.md").write_text(md + "\n\nprotocol: " + "; ".join(sorted(protocols)) + "\n")
    written = [out / "comparison.csv", out / "comparison.md", out / "ppl_vs_sparsity.png"]
    plot(rows, written[-1])
    if plot_bits(rows, out / "ppl_vs_bits.png"):
        written.append(out / "ppl_vs_bits.png")
    if plot_tradeoff(rows, out / "ppl_vs_footprint.png", lambda r: r.get("footprint_sparse_mb"),
                     "footprint with sparse storage (MiB: non-zeros + 1-bit mask)", "perplexity vs footprint"):
        written.append(out / "ppl_vs_footprint.png")
    # each run's fastest measured throughput: with the 2:4 kernels where they ran, else the dense kernels
    if plot_tradeoff(rows, out / "ppl_vs_speed.png", lambda r: r.get("sparse24_tokens_per_s") or r.get("tokens_per_s"),
                     "measured prefill tokens/s", "perplexity vs measured speed"):
        written.append(out / "ppl_vs_speed.png")
    print(md)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0

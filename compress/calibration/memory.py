"""How much memory a calibration pass adds, per mode, before it runs: the single-pass decision.

The two block modes differ in what waits inside a block:

* **two-pass** (``prune.sequential=false``): one batch's activations at a time. Beside the model it holds
  the block's inputs for every calibration sample (and, while the block's outputs are computed, its
  outputs), the block's statistics, and one linear's working memory while it is compressed.
* **single pass** (``prune.sequential=true``): every calibration sample waits at each target linear until
  all have reached it. At a linear with ``in`` input features each waiting token holds about
  ``2 * hidden + in`` values (the residual stream, the normalised block input and the linear's own
  input; at a Llama MLP's down projection that is ``2 * hidden + intermediate``), on top of the above.

:func:`estimate_peaks` walks one block's target linears in forward order, the way the engine does, and
returns the peak increase of each mode in bytes. Its terms, per linear (``n = out * in``):
statistics (float32 ``in x in`` Hessian per distinct input, freed after its last user), the damped
inverse factor (one more ``in x in`` while its users are compressed, three during its computation),
and the method's working memory (``PruningMethod.work_floats``: the new weight, scores, mask
chunks, about ``1.5 n``). One batch's forward through the block, ``batch_tokens * (4 hidden + 3 widest)``
values, is counted throughout: after the first forward about that much stays allocated on the CPU. The figures are checked against measured peaks at Llama-2-7B widths in
BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from compress.core.memory import MiB
from compress.core.modules import weight_matrix


@dataclass
class LinearShape:
    name: str
    out_features: int
    in_features: int
    group: int  # index of its distinct input (linears fed the same tensor share one)
    calls: int = 1  # calls per forward (1 for ordinary blocks)


@dataclass
class MemoryEstimate:
    single_pass_bytes: float
    two_pass_bytes: float
    inflight_bytes: float  # what the single pass holds beyond the two-pass mode at its peak
    tokens: int

    def to_dict(self) -> Dict:
        return {"single_pass_mb": round(self.single_pass_bytes / MiB, 3),
                "two_pass_mb": round(self.two_pass_bytes / MiB, 3),
                "single_pass_inflight_mb": round(self.inflight_bytes / MiB, 3), "tokens": self.tokens}


def estimate_peaks(linears: Sequence[LinearShape], hidden: int, tokens: int, batch_tokens: int, act_bytes: int,
                   hessian: bool, work_floats: Callable[[int, int], float], dense_stream: bool = False,
                   intermediate: Optional[int] = None) -> MemoryEstimate:
    """Peak memory added by one block's calibration in each mode (bytes), see the module docstring.

    ``linears`` in forward order; ``tokens``: calibration tokens in all; ``batch_tokens``: per batch;
    ``act_bytes``: bytes per activation value (the model's dtype); ``work_floats(out, in)``: float32
    values the method allocates while compressing one linear; ``dense_stream``: the dense model's
    activations are carried as well (reconstruction, error correction).
    """
    f32 = 4
    inputs = tokens * hidden * act_bytes * (2 if dense_stream else 1)  # the block's inputs, all samples
    outputs = inputs  # produced while the inputs are still alive
    widest = max([l.in_features for l in linears] + [intermediate or 0, hidden])
    # one batch through the block; after the first forward about as much stays allocated (the CPU's
    # matmul / attention workspaces), so it is counted in every phase
    forward = batch_tokens * (4 * hidden + 3 * widest) * act_bytes
    inputs += forward
    groups: Dict[int, int] = {}
    last_user: Dict[int, int] = {}
    first_user: Dict[int, int] = {}
    for i, l in enumerate(linears):
        groups.setdefault(l.group, l.in_features)
        first_user.setdefault(l.group, i)
        last_user[l.group] = i
    stat = {g: (n * n * f32 if hessian else n * f32 * 258) for g, n in groups.items()}  # H, or sqnorm + samples

    def compress_peak(i: int, live_groups) -> float:
        """Statistics alive, plus the factor and the method's working memory while linear ``i`` is compressed."""
        l = linears[i]
        live = sum(stat[g] for g in live_groups)
        n_in = l.in_features
        factor = n_in * n_in * f32 if hessian else 0
        work = work_floats(l.out_features, n_in) * f32
        if hessian and first_user[l.group] == i:  # computing the factor: three n_in^2 temporaries
            return live + max(3 * factor, factor + work)
        return live + factor + work

    # two-pass: statistics of the whole block first, then compress in order (stats freed after use)
    peak_two = inputs + sum(stat.values())
    for i in range(len(linears)):
        live = [g for g in groups if last_user[g] >= i]
        peak_two = max(peak_two, inputs + compress_peak(i, live))
    peak_two = max(peak_two, inputs + outputs)

    # single pass: statistics appear as the samples reach each linear; all samples wait at it
    peak_single, inflight_at_peak = 0.0, 0.0
    for i, l in enumerate(linears):
        live = [g for g in groups if first_user[g] <= i <= last_user[g]]
        # each waiting token holds the linear's input, and past the first input also the residual stream
        # and the normalised block input (the block's own input is already counted)
        first_group = l.group == linears[0].group
        inflight = tokens * (l.in_features if first_group else 2 * hidden + l.in_features) * act_bytes
        inflight *= 2 if dense_stream else 1
        total = inputs + inflight + compress_peak(i, live)
        if total > peak_single:
            peak_single, inflight_at_peak = total, inflight
    peak_single = max(peak_single, inputs + outputs)
    return MemoryEstimate(peak_single, peak_two, inflight_at_peak, tokens)


@torch.no_grad()
def probe_linears(block, inputs, linears: Dict[str, torch.nn.Module]) -> List[LinearShape]:
    """Run the first calibration batch through ``block`` once and record, in forward order, each target
    linear's shape, which distinct input feeds it, and how often it is called."""
    order: List[str] = []
    calls: Dict[str, int] = {}
    group_of: Dict[str, int] = {}
    by_input: Dict[int, Tuple[torch.Tensor, int]] = {}

    def hook(name):
        def pre(module, args):
            x = args[0]
            calls[name] = calls.get(name, 0) + 1
            if name not in group_of:
                hit = by_input.get(id(x))
                if hit is not None and hit[0] is x:
                    group_of[name] = hit[1]
                else:
                    group_of[name] = len(by_input)
                    by_input[id(x)] = (x, group_of[name])
                order.append(name)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        inputs.call(block, 0)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name in order + [n for n in linears if n not in calls]:
        o, i = weight_matrix(linears[name]).shape
        out.append(LinearShape(name, o, i, group_of.get(name, len(by_input) + len(out)), calls.get(name, 0)))
    return out

"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023), as a block transform of the quant stage (``transform=smoothquant``, composed
with ``quant=rtn`` or ``quant=gptq`` and, where it matters, 8-bit activations: ``quant.scheme=w8a8``).

Outlier channels of the activations are moved into the weights: for each group of coupled modules
(:func:`compress.calibration.roles.coupled_groups`), per input channel ``j``

    s_j = max|X_j| ^ alpha / max|W_j| ^ (1 - alpha)

(``max|X_j|`` over every calibration token of the block's input to the group, ``max|W_j|`` over the rows
of all the group's linears), and the producer's output features are divided by ``s`` while the linears'
input columns are multiplied by it (``fold``), which leaves the float model's function unchanged (checked
on the block's outputs). ``transform.groups``: ``norms`` (default: the norm before q/k/v and the norm
before gate/up, the paper's and the peer llm-compressor's mappings) or ``all`` (also v -> o where the
shapes allow, and up -> down).

``transform.alpha`` is the migration strength (0.5 by default, the paper's and llm-compressor's). With
``transform.search=true`` it is searched per block on ``transform.grid`` values in [0.05, 0.95]: each
candidate's block output, computed with the group's weights rounded to the stage's grid and its inputs
quantized to the stage's activation format (dynamic per token when the stage has none), is compared with
the float output (mean squared error over the first ``transform.search_samples`` calibration samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from compress.calibration.roles import block_structure, coupled_groups
from compress.core.config import choice, fraction, non_negative, positive
from compress.core.distributed import all_reduce_max_, all_reduce_sums
from compress.core.errors import UnsupportedModelError
from compress.core.grid import ActSpec, GridSpec, act_fake_quant, rtn
from compress.registry import MethodConfig, register


@dataclass
class SmoothQuantConfig(MethodConfig):
    method: str = "smoothquant"
    alpha: float = 0.5  # migration strength: 0 leaves the activations as they are, 1 moves all of their range
    search: bool = False  # search alpha per block on the block's output error
    grid: int = 10  # alphas searched: 0.05 ... 0.95 in grid steps
    search_samples: int = 8  # calibration samples the search compares (0 = all)
    groups: str = "norms"  # norms: norm -> q/k/v and norm -> gate/up; all: also v -> o and up -> down

    def validate(self) -> None:
        super().validate()
        fraction(self.key("alpha"), self.alpha)
        positive(self.key("grid"), self.grid)
        choice(self.key("groups"), self.groups, ("norms", "all"))
        non_negative(self.key("search_samples"), self.search_samples)  # 0: all

    def label(self) -> str:
        return "smoothquant " + ("alpha searched" if self.search else f"a{self.alpha:g}")


@register("transform", "smoothquant", SmoothQuantConfig)
class SmoothQuant:
    """Per-channel scales max|X|^a / max|W|^(1-a) folded into the norm or linear before, moving activation outliers into the weights (Xiao et al., 2023)"""

    name = "smoothquant"

    def __init__(self, cfg: SmoothQuantConfig, spec: GridSpec, act: Optional[ActSpec] = None):
        self.cfg, self.spec = cfg, spec
        self.act = act if act is not None else ActSpec()  # the search simulates some 8-bit activation format
        self.structure = None

    def prepare(self, model) -> None:
        self.structure = block_structure(model)  # refuses a block with no recognised roles, by name

    @torch.no_grad()
    def transform_block(self, bidx: int, block, inputs, linears) -> Dict:
        groups = coupled_groups(block, self.structure.blocks[bidx], inputs)
        if self.cfg.groups == "norms":
            groups = [g for g in groups if g.kind == "norm"]
        if not groups:
            raise UnsupportedModelError(f"smoothquant: block {bidx} has no norm feeding its linears to fold scales into")
        first = {id(next(iter(g.consumers.values()))): g.name for g in groups}
        xmax: Dict[str, torch.Tensor] = {}

        def hook(mod, args):
            name = first.get(id(mod))
            if name is not None:
                m = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
                xmax[name] = torch.maximum(xmax[name], m) if name in xmax else m

        mods = {id(m): m for g in groups for m in g.consumers.values()}
        handles = [m.register_forward_pre_hook(hook) for m in mods.values()]
        try:
            ref = [inputs.call(block, i) for i in range(len(inputs))]
        finally:
            for h in handles:
                h.remove()
        for g in groups:  # several ranks: the maximum over every rank's samples (groups in the same order on all)
            all_reduce_max_(xmax[g.name])
        n = len(inputs) if not self.cfg.search_samples else min(self.cfg.search_samples, len(inputs))
        alphas = ([0.05 + 0.9 * i / max(1, self.cfg.grid - 1) for i in range(self.cfg.grid)] if self.cfg.search
                  else [float(self.cfg.alpha)])
        report: List[Dict] = []
        for g in groups:
            x = xmax[g.name].clamp_min(1e-5)
            w = torch.cat([m.weight.detach().float().abs() for m in dict.fromkeys(g.consumers.values())], 0)
            wmax = w.amax(0).clamp_min(1e-5)
            best = (float("inf"), alphas[0], None)
            for a in alphas:
                s = (x.pow(a) / wmax.pow(1 - a)).clamp_min(1e-5)
                err = self._error(block, inputs, ref, g, s, n) if len(alphas) > 1 else 0.0
                if err < best[0]:
                    best = (err, a, s)
            g.fold(best[2])
            report.append({"group": g.name, "producer": g.producer_name, "alpha": best[1],
                           "error": best[0] if len(alphas) > 1 else None,
                           "act_max_before": float(x.max()), "act_max_after": float((x / best[2]).max()),
                           "scale_min": float(best[2].min()), "scale_max": float(best[2].max())})
        after = [inputs.call(block, i) for i in range(min(2, len(inputs)))]
        drift = max(float((_first(a).float() - _first(r).float()).norm() / _first(r).float().norm().clamp_min(1e-12))
                    for a, r in zip(after, ref))
        if drift > 1e-4:
            raise UnsupportedModelError(f"smoothquant: folding the scales of block {bidx} changed its float outputs by "
                                        f"{drift:.2e} (relative); its coupled modules {[g.name for g in groups]} are not "
                                        "what the role map says")
        return {"groups": report, "fold_drift": drift}

    def _error(self, block, inputs, ref, g, s, n) -> float:
        """Block output error (mean squared, over the first ``n`` samples of every rank) with the group's linears
        computing Q_a(x / s) Q_w(W diag(s))^T."""
        mods = list(dict.fromkeys(g.consumers.values()))
        saved = [m.weight.data.clone() for m in mods]
        keep = [None if float((w == 0).float().mean()) <= 0.01 else w != 0 for w in saved]
        si = s.to(saved[0].device)
        for m, w, k in zip(mods, saved, keep):  # what the linear computes with its input already x / s
            m.weight.data.copy_(rtn(w.float() * si.unsqueeze(0), self.spec, k)[0].to(w.dtype))

        def pre(mod, args):
            return (act_fake_quant(args[0] / si.to(args[0].dtype), self.act),) + tuple(args[1:])

        handles = [m.register_forward_pre_hook(pre) for m in mods]
        try:
            total = sum(float((_first(inputs.call(block, i)).float() - _first(ref[i]).float()).square().mean())
                        for i in range(n))
        finally:
            for h in handles:
                h.remove()
            for m, w in zip(mods, saved):
                m.weight.data.copy_(w)
        total, count = all_reduce_sums(total, n)
        return total / count


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out

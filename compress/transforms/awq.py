"""AWQ, activation-aware weight scaling (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024), as a block transform of the quant stage (``transform=awq``,
composed with ``quant=rtn`` or ``quant=gptq``).

In each block, for each group of coupled modules (:func:`compress.calibration.roles.coupled_groups`: the norm
before q/k/v, v before o where the shapes allow, the norm before gate/up, up before down), a per-channel
scale ``s`` is searched: for ``ratio`` on a grid of ``transform.grid`` points in [0, 1),

    s = mean|x| ^ ratio  (duo scaling: / mean|w| ^ (1 - ratio)),   normalised by sqrt(max(s) min(s)),

the group's linears compute with ``Q(W diag(s)) diag(1/s)`` (``Q`` the quant stage's own grid, round to
nearest, a pruned model's zeros held), and an output is compared with the float one (mean squared error) on
the first ``transform.search_samples`` calibration samples (the activation statistics use every sample).
Which output is ``transform.scope``: ``block`` (default) is the whole block's output; ``module`` (the
paper's and the peer llm-compressor's choice) is the smallest module holding the group's linears (the
attention for q/k/v, the MLP for gate/up, down itself for up -> down), replayed on its captured inputs, about
a third of the cost per compared sample. The best ``s`` is folded for real: the producer's output features
divided by ``s`` (a norm's weight and bias, or a linear's rows), the linears' input columns multiplied by it,
which leaves the float model's function unchanged (checked on the block's outputs). The quantizer then runs
on the scaled block: RTN directly, GPTQ with its Hessians collected after the fold. The saved checkpoint is
the usual compressed-tensors one, the scales folded into its weights, so it reloads stock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from compress.calibration.roles import block_structure, coupled_groups
from compress.core.config import choice, positive
from compress.core.distributed import all_reduce_sum_, all_reduce_sums
from compress.core.errors import ConfigError, UnsupportedModelError
from compress.core.grid import GridSpec, rtn
from compress.registry import MethodConfig, register


@dataclass
class AWQConfig(MethodConfig):
    method: str = "awq"
    grid: int = 20  # ratios searched: 0, 1/grid, ..., (grid - 1)/grid
    duo_scaling: bool = True  # s = x^r / w^(1-r) (llm-compressor's default) or x^r (the paper's)
    # calibration samples whose block outputs the search compares (0 = all): each of the grid x groups
    # candidates costs a block forward over them, so the search runs on the first few (the statistics use all)
    search_samples: int = 8
    # block: the block's output (measured better on SmolLM2, see BENCHMARKS.md); module: the output of the
    # smallest module holding the group (the paper's and llm-compressor's choice, cheaper per candidate)
    scope: str = "block"

    def validate(self) -> None:
        super().validate()
        positive(self.key("grid"), self.grid)
        choice(self.key("scope"), self.scope, ("module", "block"))
        if isinstance(self.search_samples, bool) or not isinstance(self.search_samples, int) or self.search_samples < 0:
            raise ConfigError(f"{self.key('search_samples')}={self.search_samples!r} is not valid: 0 (all) or a "
                              "positive number of calibration samples")

    def label(self) -> str:
        return "awq" + ("" if self.duo_scaling else " x-only")


def _keep(w: torch.Tensor):
    zeros = w == 0
    return ~zeros if float(zeros.float().mean()) > 0.01 else None  # a pruned linear keeps its zeros


@register("transform", "awq", AWQConfig)
class AWQ:
    """Activation-aware per-channel scales searched on each block's output error and folded into the norm or linear before (Lin et al., 2024)"""

    name = "awq"

    def __init__(self, cfg: AWQConfig, spec: GridSpec, act=None):  # act: the stage's activation format (unused)
        self.cfg, self.spec = cfg, GridSpec(spec.bits, spec.symmetric, spec.group_size, type=spec.type)
        self.structure = None

    def prepare(self, model) -> None:
        self.structure = block_structure(model)  # refuses a block with no recognised roles, by name

    @torch.no_grad()
    def _outputs(self, block, inputs, n):
        return [inputs.call(block, i) for i in range(n)]

    def _scope(self, g) -> str:
        """The name (in the block) of the module whose output the search compares: the deepest module
        holding all of the group's linears (one linear: itself), or "" for the block."""
        if self.cfg.scope == "block":
            return ""
        common = []
        for seg in zip(*[n.split(".") for n in g.consumer_names]):
            if len(set(seg)) > 1:
                break
            common.append(seg[0])
        return ".".join(common)

    @staticmethod
    def _first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def transform_block(self, bidx: int, block, inputs, linears) -> Dict:
        n = len(inputs) if not self.cfg.search_samples else min(self.cfg.search_samples, len(inputs))
        groups = coupled_groups(block, self.structure.blocks[bidx], inputs)
        # mean |x| per input channel of each group, over every calibration token (one pass with hooks)
        means: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        first = {id(next(iter(g.consumers.values()))): g.name for g in groups}
        mods = {id(m): m for g in groups for m in g.consumers.values()}

        def hook(mod, args):
            name = first.get(id(mod))
            if name is not None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                # float64 sums: the same mean whatever the order of the tokens (one process or several ranks)
                means[name] = means.get(name, 0) + x.abs().sum(0, dtype=torch.float64)
                counts[name] = counts.get(name, 0) + x.shape[0]

        scopes = {g.name: self._scope(g) for g in groups}
        captured: Dict[str, List] = {sc: [] for sc in scopes.values() if sc}  # scope -> [(args, kwargs, out)]

        def capture(scope):
            def post(mod, args, kwargs, out):
                if len(captured[scope]) < n:
                    captured[scope].append((args, kwargs, self._first(out).detach()))
            return post

        handles = [m.register_forward_pre_hook(hook) for m in mods.values()]
        handles += [block.get_submodule(sc).register_forward_hook(capture(sc), with_kwargs=True) for sc in captured]
        try:
            ref = self._outputs(block, inputs, len(inputs))
        finally:
            for h in handles:
                h.remove()

        def error(scope):
            if not scope:
                pairs = zip(self._outputs(block, inputs, n), ref[:n])
            else:
                mod = block.get_submodule(scope)
                pairs = ((self._first(mod(*a, **k)), r) for a, k, r in captured[scope])
            total, count = all_reduce_sums(sum(float((o.float() - r.float()).square().mean()) for o, r in pairs), n)
            return total / count  # several ranks: over the first n samples of every rank

        report: List[Dict] = []
        for g in groups:  # several ranks: the sums over every rank's tokens (groups in the same order on all)
            all_reduce_sum_(means[g.name])
            counts[g.name] = int(all_reduce_sums(counts[g.name])[0])
        for g in groups:
            x_mean = (means[g.name] / counts[g.name]).float().clamp_min(1e-8)
            weights = {id(m): m.weight for m in g.consumers.values()}
            saved = {k: w.data.clone() for k, w in weights.items()}
            w_mean = self._weight_mean(list(saved.values()))
            best = (float("inf"), None, None)
            for step in range(self.cfg.grid):
                ratio = step / self.cfg.grid
                s = x_mean.pow(ratio)
                if self.cfg.duo_scaling:
                    s = s / (w_mean.pow(1 - ratio) + 1e-4)
                s = (s / (s.max() * s.min()).sqrt()).clamp_min(1e-4)
                for k, w in weights.items():  # Q(W diag(s)) diag(1/s): what the linear computes once folded
                    ws = saved[k].float() * s.unsqueeze(0)
                    w.data.copy_((rtn(ws, self.spec, _keep(saved[k]))[0] / s.unsqueeze(0)).to(w.dtype))
                err = error(scopes[g.name])
                if err < best[0]:
                    best = (err, ratio, s.clone())
            for k, w in weights.items():
                w.data.copy_(saved[k])
            g.fold(best[2])
            report.append({"group": g.name, "producer": g.producer_name, "scope": scopes[g.name] or "block",
                           "ratio": best[1], "error": best[0],
                           "scale_min": float(best[2].min()), "scale_max": float(best[2].max())})
        after = self._outputs(block, inputs, min(2, len(inputs)))
        drift = max(float((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)) for a, r in zip(after, ref))
        if drift > 1e-4:
            raise UnsupportedModelError(f"awq: folding the scales of block {bidx} changed its float outputs by {drift:.2e} "
                                        f"(relative); its coupled modules {[g.name for g in groups]} are not what the "
                                        "role map says")
        return {"groups": report, "fold_drift": drift}

    def _weight_mean(self, ws: List[torch.Tensor]) -> torch.Tensor:
        """Per input channel, the mean over the group's rows of |W| normalised by its quant group's max."""
        w = torch.cat([x.float() for x in ws], 0).abs()
        g = w.shape[1] if self.spec.whole_rows else self.spec.group_size
        wg = w.view(w.shape[0], -1, g)
        wg = wg / wg.amax(-1, keepdim=True).clamp_min(1e-8)
        return wg.view(w.shape[0], -1).mean(0)

"""Statistics of a linear's inputs over the calibration tokens, and the collector that feeds them.

:class:`InputStats` holds what a method asked for (a method declares ``needs_hessian`` /
``needs_sqnorm``): the token count, per-input-column squared norms, the float32 Hessian ``X^T X`` and,
without a Hessian, a token subsample for error reporting. :class:`StatsCollector` puts forward
pre-hooks on the target linears of one block; linears fed the very same input tensor (q/k/v,
gate/up) share one ``InputStats``, so the Hessian is accumulated (and later factorised) once per
distinct input.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional

import torch
from torch import nn

from compress.calibration.blocks import BlockInputs
from compress.core.distributed import active, all_reduce_sum_
from compress.core.linalg import damped_inverse_cholesky


class InputStats:
    """Statistics of one linear input over the calibration tokens (all float32)."""

    PANEL = 192
    SAMPLE_STRIDE = 64  # without H, the error is estimated on every 64th token (at most sample_tokens)

    def __init__(self, in_features: int, hessian: bool, sqnorm: bool, sample_tokens: int = 256, device=None,
                 moments: bool = False):
        self.tokens = 0
        # per input column, in float64: the sum and the sum of squares (means and variances, e.g. FLAP)
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device) if moments else None
        self.sumsq = torch.zeros(in_features, dtype=torch.float64, device=device) if moments else None
        # upper triangle only during accumulation (half the FLOPs of X^T X); made full in place on first
        # use of :attr:`H`, after which no more tokens can be added
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self._full = False
        self.sqnorm = torch.zeros(in_features, dtype=torch.float32, device=device) if sqnorm else None
        self.G: Optional[torch.Tensor] = None  # X_dense^T X (error correction), allocated on first use
        self.sample_tokens = sample_tokens
        self.samples = []
        self._sampled = 0
        self._factors: Dict[tuple, tuple] = {}  # damped inverse factors, shared by q/k/v and gate/up

    @property
    def H(self) -> Optional[torch.Tensor]:
        """The full symmetric ``X^T X`` (float32)."""
        if self._H is None:
            return None
        if not self._full:  # mirror the upper triangle in place (one n x n temporary)
            self._H.triu_()
            self._H.add_(self._H.triu(1).t())
            self._full = True
        return self._H

    @property
    def mean(self) -> torch.Tensor:
        """Per input column, the mean over the calibration tokens (float64; needs ``moments``)."""
        return self.sum / self.tokens

    @property
    def var(self) -> torch.Tensor:
        """Per input column, the unbiased sample variance over the calibration tokens (float64)."""
        return (self.sumsq - self.tokens * self.mean.square()) / max(1, self.tokens - 1)

    def hinv_factor(self, percdamp: float, damp_mode: str = "mean") -> torch.Tensor:
        """Upper Cholesky factor of the damped ``H^-1``, computed once per distinct input."""
        return self.damped_factor(percdamp, damp_mode)[0]

    def damped_factor(self, percdamp: float, damp_mode: str = "mean") -> tuple:
        """``(U, Damping)`` from :func:`damped_inverse_cholesky`, cached per damping setting."""
        key = (percdamp, damp_mode)
        if key not in self._factors:
            self._factors[key] = damped_inverse_cholesky(self.H, percdamp, damp_mode)
        return self._factors[key]

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_dense: Optional[torch.Tensor] = None) -> None:
        if self._full or self._factors:
            raise RuntimeError("InputStats.add after the Hessian was used: statistics are complete")
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if x_dense is not None:
            if self.G is None:
                self.G = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.G.addmm_(x_dense.reshape(-1, x.shape[-1]).float().t(), x)
        if self._H is not None:
            xt = x.t()
            for a in range(0, x.shape[1], self.PANEL):  # row panels of the upper triangle
                self._H[a:a + self.PANEL, a:].addmm_(xt[a:a + self.PANEL], x[:, a:])
        if self.sqnorm is not None:
            self.sqnorm.add_(x.square().sum(0))
        if self.sum is not None:
            xd = x.double()
            self.sum += xd.sum(0)
            self.sumsq += xd.square().sum(0)
        if self._H is None and self._sampled < self.sample_tokens:  # error estimate when H is not collected
            take = x[:: self.SAMPLE_STRIDE][: self.sample_tokens - self._sampled]
            self.samples.append(take.clone())
            self._sampled += take.shape[0]
        self.tokens += n

    def all_reduce(self) -> None:
        """Several ranks, each with a slice of the calibration samples: every sum summed over the ranks (the
        token subsample for error estimates stays each rank's own)."""
        if not active():
            return
        if self._full or self._factors:
            raise RuntimeError("InputStats.all_reduce after the Hessian was used")
        for t in (self._H, self.sqnorm, self.sum, self.sumsq, self.G):
            all_reduce_sum_(t)
        n = torch.tensor([float(self.tokens)], dtype=torch.float64)
        self.tokens = int(all_reduce_sum_(n).item())

    ERROR_CHUNK_ELEMENTS = 1 << 20

    def relative_error(self, w_dense: torch.Tensor, w_new: torch.Tensor) -> Optional[float]:
        """||W X - W' X|| / ||W X|| on the calibration inputs (exact with H, else on a token subsample).
        Computed over chunks of rows, so that it needs little memory beside the two weights."""
        if self._H is None and not self.samples:
            return None
        if self._H is None:
            xs = self.samples[0] if len(self.samples) == 1 else torch.cat(self.samples)
            self.samples = [xs]
        H = self.H
        num = den = 0.0
        step = max(1, self.ERROR_CHUNK_ELEMENTS // w_dense.shape[1])
        for r in range(0, w_dense.shape[0], step):
            w = w_dense[r:r + step].float()
            d = w - w_new[r:r + step].float()
            if H is not None:
                num += float(((d @ H) * d).sum())
                den += float(((w @ H) * w).sum())
            else:
                y = xs @ torch.cat([d, w]).t()  # one GEMM for both
                num += float(y[:, :d.shape[0]].square().sum())
                den += float(y[:, d.shape[0]:].square().sum())
        return (max(num, 0.0) / max(den, 1e-30)) ** 0.5


class StatisticsComplete(Exception):
    """Raised by a statistics hook once the current batch has fed every target linear."""


class StatsCollector:
    """Pre-hooks on the target linears of one block that feed :class:`InputStats`.

    ``hessian`` / ``sqnorm`` / ``moments``: what the method declared it needs. ``on_input(name)`` is called after each
    input is recorded (the single pass pauses there). With ``record=True`` the hooks keep each distinct
    input instead (the dense inputs used by error correction). ``release(name)`` drops a linear's
    statistics once it is compressed; with ``groups`` (which linears share an input, from
    :func:`compress.calibration.memory.probe_linears`) a shared Hessian is freed as soon as its last user
    is released, else when the collector is removed. Inputs are tracked by weak reference only, so the
    collector keeps no activation alive.
    """

    def __init__(self, linears: Dict[str, nn.Module], hessian: bool, sqnorm: bool, device,
                 groups: Optional[Dict[str, int]] = None, moments: bool = False):
        self.linears = linears
        self.hessian, self.sqnorm, self.moments = hessian, sqnorm, moments
        self.device = device
        self.groups = groups
        self.stats: Dict[str, InputStats] = {}
        self.order: List[str] = []  # first-call order of the linears (forward order)
        self.current = 0  # batch index (set by the caller)
        self._seen: Dict[int, Dict[int, tuple]] = {}  # per batch: id(input) -> (weakref to it, first linear fed)
        self._shared: Dict[str, InputStats] = {}  # first linear fed an input -> its statistics, for the others
        self._owner: Dict[str, str] = {}  # linear -> first linear of its input
        self._released: set = set()
        self.on_input = None
        self.record = False
        self.recorded: Dict[str, List[torch.Tensor]] = {}
        self.dense_inputs: Optional[Dict[str, List[torch.Tensor]]] = None
        self.stop_when_complete = False  # collect_all: stop a batch once it has fed every target linear
        self._calls: Dict[object, Dict[str, int]] = {}  # per batch: hook calls per linear
        self.handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in linears.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            seen = self._seen.setdefault(self.current, {})
            hit = seen.get(id(x))
            first = hit[1] if hit is not None and hit[0]() is x else None  # an earlier linear got this very tensor
            if self.record:  # dense pass for error correction: keep each distinct input once
                if first is not None:
                    self.recorded[name] = self.recorded[first]
                else:
                    self.recorded.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).clone())
                    seen[id(x)] = (weakref.ref(x), name)
                return None
            fresh = False
            if name not in self.stats:
                st = self._shared.get(first) if first is not None else None
                if st is None:  # a new input (or one whose statistics were already released: counted anew)
                    st, fresh = InputStats(x.shape[-1], self.hessian, self.sqnorm, device=self.device,
                                                moments=self.moments), True
                    self._shared[name] = st
                self.stats[name] = st
                self._owner[name] = name if fresh else first
                self.order.append(name)
            if first is None or fresh:
                if first is None:
                    seen[id(x)] = (weakref.ref(x), name)
                xd = self.dense_inputs[name][self.current] if self.dense_inputs is not None else None
                self.stats[name].add(x, xd)
            if self.on_input is not None:
                self.on_input(name)
            calls = self._calls.setdefault(self.current, {})
            calls[name] = calls.get(name, 0) + 1
            if self.stop_when_complete and len(calls) == len(self.linears):
                raise StatisticsComplete
            return None
        return hook

    def release(self, name: str) -> None:
        """Forget ``name``'s statistics: freed once every linear of its input group is released."""
        self.stats.pop(name, None)
        self._released.add(name)
        if self.dense_inputs is not None:
            self.dense_inputs.pop(name, None)
        owner = self._owner.get(name)
        if self.groups is not None and owner is not None and name in self.groups:
            g = self.groups[name]
            if all(n in self._released for n, gg in self.groups.items() if gg == g):
                self._shared.pop(owner, None)

    def end_batch(self, key):
        self._seen.pop(key, None)
        self._calls.pop(key, None)

    def forward_all(self, block: nn.Module, inputs: BlockInputs) -> List[torch.Tensor]:
        """Run every batch through ``block`` with the hooks live (statistics or recording)."""
        outs = []
        for b in range(len(inputs)):
            self.current = b
            outs.append(inputs.call(block, b))
            self.end_batch(b)
        return outs

    def collect_all(self, block: nn.Module, inputs: BlockInputs) -> None:
        """Statistics only, outputs not wanted: after the first batch has shown that every target linear
        is called exactly once per forward, each later batch stops as soon as it has fed all of them
        (the rest of the block, e.g. the down projection and what follows it, is skipped). Blocks that
        call a target linear more or less than once (shared or routed modules) run in full."""
        self.current = 0
        inputs.call(block, 0)
        calls = self._calls.get(0, {})
        self.end_batch(0)
        self.stop_when_complete = len(calls) == len(self.linears) and all(c == 1 for c in calls.values())
        try:
            for b in range(1, len(inputs)):
                self.current = b
                try:
                    inputs.call(block, b)
                except StatisticsComplete:
                    pass
                self.end_batch(b)
        finally:
            self.stop_when_complete = False

    def remove(self):
        for h in self.handles:
            h.remove()
        self._seen.clear()
        self._shared.clear()


def run_single_pass(block: nn.Module, inputs: BlockInputs, collector: StatsCollector, compress_fn) -> List[torch.Tensor]:
    """One forward of all batches in lock-step: each batch runs in its own greenlet and pauses at every
    target linear once its input is recorded. When all batches wait at the same linear, its statistics
    are complete: ``compress_fn(name)`` compresses it, and the batches resume *through the compressed
    linear*. Returns the block's outputs (from the same pass)."""
    import greenlet

    main = greenlet.getcurrent()
    outs: List[Optional[torch.Tensor]] = [None] * len(inputs)
    waiting: Dict[int, str] = {}

    def pause(name):
        main.switch(name)

    collector.on_input = pause

    def body(b):
        def run():
            with torch.no_grad():
                outs[b] = inputs.call(block, b)
            return None
        return run

    lets = [greenlet.greenlet(body(b)) for b in range(len(inputs))]
    pending = set(range(len(inputs)))
    try:
        while pending:
            waiting.clear()
            for b in sorted(pending):
                collector.current = b
                name = lets[b].switch()
                if lets[b].dead:
                    collector.end_batch(b)
                    pending.discard(b)
                else:
                    waiting[b] = name
            if not waiting:
                break
            names = set(waiting.values())
            if len(names) != 1:
                raise RuntimeError(f"single pass: batches diverged at {sorted(names)}; use prune.sequential=false")
            compress_fn(names.pop())
    finally:
        collector.on_input = None
    return outs  # type: ignore[return-value]

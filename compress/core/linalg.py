"""Damped Cholesky: the one routine behind SparseGPT, GPTQ and the joint mode.

:func:`damped_inverse_cholesky` returns the upper Cholesky factor ``U`` of ``(H + damp I)^-1``
(``U^T U = (H + damp I)^-1``), the matrix the ordered-column OBS loop walks. The damping starts at
``percdamp`` times the mean (or median) of ``diag(H)`` and is raised tenfold, up to five times, when the
factorisation fails; the damping actually used is returned with the factor, so that callers record
it per module. It never falls back silently: if even the last attempt fails it raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_ATTEMPTS = 6  # damping x1, x10, ..., x1e5


class NotPositiveDefinite(RuntimeError):
    pass


@dataclass
class Damping:
    """What :func:`damped_inverse_cholesky` used: the relative damping asked for, the one that worked
    (``percdamp * 10**raised``) and its absolute value."""

    percdamp: float
    used_percdamp: float
    absolute: float
    raised: int  # how many times the damping was raised tenfold
    dead_inputs: int  # inputs never activated (zero diagonal), set to 1 on the diagonal

    def to_dict(self):
        return {"percdamp": self.percdamp, "used_percdamp": self.used_percdamp, "absolute": self.absolute,
                "raised": self.raised, "dead_inputs": self.dead_inputs}


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float, damp_mode: str = "mean"):
    """``(U, Damping)``: the upper Cholesky factor of the damped ``H^-1`` (float32). ``H`` is not modified.

    Dead inputs (zero diagonal) get 1 on the diagonal first. One factorisation and one triangular
    solve: with ``J`` the order reversal, ``U = J L^-1 J`` where ``L = chol(J H J)``
    (``cholesky_inverse`` followed by a second factorisation is several times slower on CPU). Working
    memory: three ``n x n`` float32 matrices beside ``H``.
    """
    if damp_mode not in ("mean", "median"):
        raise ValueError(f"damp_mode={damp_mode!r}: expected 'mean' or 'median'")
    n = H.shape[0]
    dead = torch.diagonal(H) == 0
    # the mean (or median) of the diagonal as a strided view of the matrix, as the reference code takes it: a
    # contiguous copy sums in another order, and the last bit of the damping moves masks downstream
    src = H.float()
    if bool(dead.any()):
        src = src.clone()
        src[dead, dead] = 1
    diag = torch.diagonal(src)
    base = percdamp * (diag.mean() if damp_mode == "mean" else diag.median())  # median: robust to massive activations
    for attempt in range(MAX_ATTEMPTS):
        damp = base * (10 ** attempt)
        Hd = H.float().flip(0, 1)  # a copy
        Hd.diagonal().copy_((diag + damp).flip(0))  # H_ii + damp, as (H + damp I) computes it
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            eye = torch.eye(n, dtype=L.dtype, device=L.device)
            U = torch.linalg.solve_triangular(L, eye, upper=False)
            del L, eye, src
            return U.flip(0, 1), Damping(float(percdamp), float(percdamp) * 10 ** attempt, float(damp), attempt,
                                         int(dead.sum()))
        del L
    raise NotPositiveDefinite(f"the Hessian ({n} x {n}) is not positive definite even with the damping raised "
                              f"to {percdamp * 10 ** (MAX_ATTEMPTS - 1):g} x its mean diagonal")


@torch.no_grad()
def corrected_target(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor, percdamp: float, damp_mode: str = "mean"):
    """Least-squares weight that maps the pruned model's inputs to the dense model's outputs:
    ``argmin_V ||W X_d - V X_p||`` = ``W G H^-1`` with ``G = X_d^T X_p`` and ``H = X_p^T X_p`` (damped as in
    SparseGPT). Pruning this target with the usual OBS objective on ``H`` then minimises the error against
    the dense outputs, so errors from earlier layers are corrected instead of copied."""
    diag = torch.diagonal(H)
    damp = percdamp * (diag.mean() if damp_mode == "mean" else diag.median())
    Hd = H.clone()
    Hd.diagonal().add_(damp)
    dead = diag == 0
    Hd[dead, dead] = 1
    L = torch.linalg.cholesky(Hd)
    rhs = (W.float() @ G).t()  # [in, out]
    return torch.cholesky_solve(rhs, L).t()

"""Hadamard matrices (entries +-1, ``H H^T = n I``) of the orders the residual streams of LLMs have, built
from three classical constructions, and orthogonal rotations from them.

* Sylvester: order ``2^k``;
* Paley I: order ``q + 1`` for a prime ``q = 3 (mod 4)`` (12, 20, 24, 32, 44, 48, 60, 68, ...);
* Paley II: order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (12, 28, 36, 60, 76, ...);
* Kronecker products: ``H_m (x) H_{2^k}``.

So 576 (SmolLM2-135M: H_72 x H_8), 960, 3072, 5120, 11008 and every power of two are covered (checked
``H H^T = n I`` in the tests). :func:`rotation` returns a randomized Hadamard ``H diag(signs) / sqrt(n)`` (QuaRot's choice),
or, for an order none of these constructions gives, a random orthogonal matrix (QR of a Gaussian, signs
fixed), and says which.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    i = 2
    while i * i <= q:
        if q % i == 0:
            return False
        i += 1
    return True


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)``, chi the quadratic character modulo the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _base(m: int) -> Optional[Tuple[torch.Tensor, str]]:
    """A Hadamard matrix of order ``m`` from Paley I or II (``m`` not a power of two), or None."""
    if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1), f"Paley I, q={m - 1}"
    if m % 4 == 0 and m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1), f"Paley II, q={m // 2 - 1}"
    return None


def hadamard(n: int) -> Optional[Tuple[torch.Tensor, str]]:
    """A Hadamard matrix of order ``n`` (float64, entries +-1) and how it was built, or None when none of
    the constructions above gives this order."""
    if n >= 1 and n & (n - 1) == 0:
        return _sylvester(n), f"Sylvester {n}"
    k = 1
    while n % (2 * k) == 0:
        k *= 2
    # n = m * p, p a power of two: the largest Paley factor m first (the rest is Sylvester)
    p = 1
    while p <= k:
        m = n // p
        if n % p == 0:
            base = _base(m)
            if base is not None:
                h, how = base
                return (torch.kron(h, _sylvester(p)) if p > 1 else h), f"H_{m} ({how}) x H_{p} (Sylvester)"
        p *= 2
    return None


def rotation(n: int, seed: int = 0, kind: str = "hadamard") -> Tuple[torch.Tensor, str]:
    """An ``n x n`` orthogonal matrix (float64) and its description: ``kind="hadamard"``: a Hadamard matrix
    with random column signs, normalised (a random orthogonal matrix where no Hadamard of order ``n`` is
    constructible here); ``kind="random"``: a random orthogonal matrix (QR of a Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        h = hadamard(n)
        if h is not None:
            signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
            return h[0] * signs.unsqueeze(0) / n ** 0.5, f"randomized Hadamard, {h[1]}"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q, ("random orthogonal (QR of a Gaussian)" if kind == "random"
               else f"random orthogonal (QR of a Gaussian): no Hadamard of order {n} is constructible here")

"""Analytic forward FLOPs per token, from shapes only (zeros in sparse weights count: dense kernels
multiply them; a packed bitsandbytes weight counts as its float shape)."""

from __future__ import annotations

from typing import Dict, Iterable, Tuple


def flops_per_token(linear_shapes: Iterable[Tuple[int, int]], attention: Iterable[Tuple[int, int]],
                    lm_head_numel: int, seqlen: int, last_logits_only: bool = True) -> Dict:
    """FLOPs per token of a prefill of ``seqlen`` tokens: 2 x every block linear's ``out x in``, plus each
    block's attention scores and weighted sum, 2 x 2 x heads x head_dim x the mean causal context
    ((seqlen + 1) / 2) for every ``(heads, head_dim)`` in ``attention``, plus the LM head (once per
    sequence with ``last_logits_only``, as a serving engine computes it)."""
    lin = sum(2 * o * i for o, i in linear_shapes)
    ctx = (seqlen + 1) / 2
    attn = sum(4 * h * d * ctx for h, d in attention)
    head = 2 * lm_head_numel * ((1 / seqlen) if last_logits_only else 1)
    return {"linear": lin, "attention": attn, "lm_head": head, "total": lin + attn + head, "seqlen": seqlen}

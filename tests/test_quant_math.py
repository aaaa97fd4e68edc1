"""Quantizer math on small matrices: the grid, RTN, the shared OBS loop with its quantizer hook (GPTQ),
the joint mode, the damping. Pure functions, no model."""

import pytest
import torch

from compress.core.linalg import damped_inverse_cholesky
from compress.calibration.obs import obs_compress
from compress.core.masks import check_nm
from compress.core.grid import GridSpec, dequantize, expand, fit_groups, qrange, quantize, rtn
from compress.quant.gptq import gptq_quantize


def _data(rows=48, cols=128, tokens=2048, seed=0):
    """Correlated inputs with a few outlier channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(cols)
    scale[:3] = 15.0
    x = (torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols ** 0.5
         + torch.randn(tokens, cols, generator=g)) * scale
    w = torch.randn(rows, cols, generator=g) * 0.05
    return x, w


def _out_err(x, w, wq):
    return float((x @ (w - wq).t()).norm() / (x @ w.t()).norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [-1, 32])
def test_rtn_round_trip_on_the_grid(bits, symmetric, group):
    """Codes are integers in range, the dequantized values are (q - zero) * scale exactly, every weight is
    within half a step of its value, and the scale and zero point follow the documented formulas."""
    _, w = _data()
    spec = GridSpec(bits=bits, symmetric=symmetric, group_size=group)
    deq, scale, zero = rtn(w, spec)
    gcols = w.shape[1] if group == -1 else group
    assert scale.shape == (w.shape[0], w.shape[1] // gcols)
    qmin, qmax = qrange(bits)
    s = scale.repeat_interleave(gcols, 1)
    z = None if zero is None else zero.repeat_interleave(gcols, 1)
    q = quantize(w, s, z, bits)
    assert torch.equal(q, q.round()) and q.min() >= qmin and q.max() <= qmax
    assert torch.equal(deq, dequantize(q, s, z))
    assert bool(((deq - w).abs() <= s / 2 + 1e-6).all())
    wg = w.view(w.shape[0], -1, gcols)
    if symmetric:
        assert zero is None
        assert torch.allclose(scale, wg.abs().amax(-1) / ((2 ** bits - 1) / 2))
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        assert torch.allclose(scale, (hi - lo) / (2 ** bits - 1))
        assert torch.equal(zero, torch.clamp(torch.round(qmin - lo / scale), qmin, qmax))
        assert bool((zero >= qmin).all() and (zero <= qmax).all())


def test_zero_is_on_the_grid_and_pruned_weights_stay_zero():
    _, w = _data()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    w = w * keep
    for symmetric in (True, False):
        deq, _, _ = rtn(w, GridSpec(4, symmetric, 32), keep)
        assert bool((deq[~keep] == 0).all())
        deq2, _, _ = rtn(w, GridSpec(4, symmetric, 32))  # even without the mask: 0 is a grid point
        assert bool((deq2[~keep] == 0).all())


def test_mse_clipping_lowers_the_rounding_error():
    _, w = _data()
    w[:, 0] *= 30  # an outlier per row: clipping pays
    plain = rtn(w, GridSpec(3, False, 32))[0]
    mse = rtn(w, GridSpec(3, False, 32, mse=True))[0]
    assert (mse - w).norm() < (plain - w).norm()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(symmetric, group, act_order):
    """On the same layer and inputs, GPTQ's output error is below RTN's; its weights are on its grid."""
    x, w = _data()
    H = x.t() @ x
    spec = GridSpec(3, symmetric, group)
    q = gptq_quantize(w, H, spec, blocksize=32, act_order=act_order)
    r = rtn(w, spec)[0]
    assert _out_err(x, w, q.weight) < 0.95 * _out_err(x, w, r)
    gcols = w.shape[1] if group == -1 else group
    s = q.scale.repeat_interleave(gcols, 1)
    z = None if q.zero is None else q.zero.repeat_interleave(gcols, 1)
    assert torch.equal(dequantize(quantize(q.weight, s, z, 3), s, z), q.weight)  # exactly on the grid
    assert q.info["damping"]["raised"] == 0


def test_gptq_keeps_a_pruned_models_zeros_and_nm():
    """GPTQ after pruning (two passes): the zeros and the 2:4 pattern hold in 100% of groups."""
    from compress.pruning.sparsegpt import sparsegpt_prune

    x, w = _data()
    H = x.t() @ x
    pruned = sparsegpt_prune(w, H, 0.0, (2, 4), blocksize=32)
    keep = pruned != 0
    for act_order in (False, True):
        q = gptq_quantize(pruned, H, GridSpec(4, False, 32), blocksize=32, act_order=act_order, keep=keep)
        assert bool((q.weight[~keep] == 0).all()) and check_nm(q.weight, 2, 4)
        assert bool(((q.weight != 0).view(48, -1, 4).sum(-1) <= 2).all())


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("act_order", [False, True])
def test_joint_one_pass_prunes_and_quantizes_in_one_loop(nm, act_order):
    """The joint mode chooses the mask and quantizes in the same column loop: exact sparsity / N:M (also
    with act-order, which then orders whole N:M groups), kept weights on the grid, and an output error
    below pruning then rounding."""
    x, w = _data()
    H = x.t() @ x
    spec = GridSpec(4, False, 32)
    joint = gptq_quantize(w, H, spec, blocksize=32, sparsity=0.0 if nm else 0.5, nm=nm, act_order=act_order)
    s, z = expand(joint.scale, spec, w.shape[1]), expand(joint.zero, spec, w.shape[1])
    assert torch.equal(dequantize(quantize(joint.weight, s, z, 4), s, z), joint.weight)  # on the grid
    zeros = float((joint.weight == 0).float().mean())
    assert zeros == pytest.approx(0.5, abs=0.01)
    if nm:
        assert check_nm(joint.weight, *nm)
    from compress.pruning.sparsegpt import sparsegpt_prune

    pruned = sparsegpt_prune(w, H, 0.0 if nm else 0.5, nm, blocksize=32)
    naive = rtn(pruned, spec, pruned != 0)[0]
    assert _out_err(x, w, joint.weight) < _out_err(x, w, naive)


def test_obs_without_a_quantizer_is_sparsegpt():
    from compress.pruning.sparsegpt import sparsegpt_prune

    x, w = _data()
    H = x.t() @ x
    U, _ = damped_inverse_cholesky(H, 0.01)
    assert torch.equal(obs_compress(w, U, 32, sparsity=0.5).weight, sparsegpt_prune(w, H, 0.5, None, blocksize=32))


def test_a_hessian_that_is_not_positive_definite_raises_the_damping():
    """A rank-deficient H pushed below zero (as accumulated rounding can): the factorisation with the usual
    1% damping fails, the damping is raised tenfold and the damping actually used is returned (GPTQ
    records it per module)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g)  # 8 tokens, 64 inputs: rank 8
    H = x.t() @ x
    H -= 0.02 * torch.diagonal(H).mean() * torch.eye(64)  # 56 eigenvalues at -2% of the mean diagonal
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(H + 0.01 * torch.diagonal(H).mean() * torch.eye(64))
    U, d = damped_inverse_cholesky(H, 0.01)
    assert d.raised == 1 and d.used_percdamp == pytest.approx(0.1)
    assert torch.isfinite(U).all()
    w = torch.randn(16, 64, generator=g)
    q = gptq_quantize(w, H, GridSpec(4, True, 32))
    assert q.info["damping"]["raised"] == 1 and q.info["damping"]["used_percdamp"] == pytest.approx(0.1)


def test_a_hopeless_hessian_fails_loudly():
    from compress.core.linalg import NotPositiveDefinite

    H = -torch.eye(16) * 1e6
    H[0, 0] = 1.0
    with pytest.raises(NotPositiveDefinite, match="not positive definite"):
        damped_inverse_cholesky(H, 1e-6)


def test_static_groups_cover_each_groups_own_columns():
    _, w = _data()
    spec = GridSpec(4, True, 32)
    s, _ = fit_groups(w, spec)
    assert torch.allclose(s[:, 1], w[:, 32:64].abs().amax(1) / 7.5)


@pytest.mark.parametrize("dead", [False, True])
def test_damped_factor_is_bitwise_the_reference_computation(dead):
    """The factor equals, bit for bit, the reference code's (clone H, dead diagonal to 1, damping from the
    mean of the diagonal view, H + damp I, flip, Cholesky, triangular inverse): P1 figures depend on it."""
    x, _ = _data(cols=96, tokens=500, seed=4)
    if dead:
        x[:, 5] = 0
    H = x.t() @ x
    ref = H.clone()
    d = torch.diagonal(ref) == 0
    ref[d, d] = 1
    damp = 0.01 * torch.diagonal(ref).mean()
    eye = torch.eye(96)
    L = torch.linalg.cholesky((ref + eye * damp).flip(0, 1))
    expected = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
    U, info = damped_inverse_cholesky(H, 0.01)
    assert torch.equal(U, expected) and info.dead_inputs == int(dead)


def test_on_grid_checks_every_row_chunk():
    """on_grid walks the rows in chunks: a single weight off its grid in a later chunk is found."""
    from compress.core.grid import on_grid

    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 128, generator=g)
    spec = GridSpec(4, False, 32)
    wq, scale, zero = rtn(w, spec)
    assert on_grid(wq, scale, zero, spec)
    wq[517, 77] += 1e-3
    assert not on_grid(wq, scale, zero, spec)

import pytest
import torch

from compress.calibration.blocks import capture_block_inputs, find_blocks
from compress.calibration.targets import block_targets
from compress.core.modules import weight_matrix
from compress.config import prune_config
from compress.evaluate import perplexity_from_ids
from compress.calibration.stats import InputStats
from compress.core.masks import check_nm, make_mask, nm_mask, unstructured_mask
from compress.pruning.sparsegpt import sparsegpt_prune
from compress.stages.prune import prune_model


def target_linears(block, cfg):
    return block_targets(block, cfg.targets, cfg.ignore)


def _sgpt(method):
    """SparseGPT's column block for the tiny widths: a key only SparseGPT has (another method refuses it)."""
    return {"blocksize": 32} if method == "sparsegpt" else {}

from .conftest import ALL_FAMILIES


# ---- masks (pure functions) ----
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_exact_in_every_group(n, m):
    s = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(s, n, m)
    assert bool((mask.view(16, -1, m).sum(-1) == n).all())
    # the kept ones are the top-n of each group
    g = s.view(16, -1, m)
    kth = g.topk(n, dim=-1).values[..., -1:]
    assert bool((g[mask.view(16, -1, m)] >= kth.expand_as(g)[mask.view(16, -1, m)]).all())


def test_nm_mask_partial_tail_group():
    s = torch.randn(3, 10)
    mask = nm_mask(s, 2, 4)
    assert bool((mask[:, :8].view(3, 2, 4).sum(-1) == 2).all())
    assert bool((mask[:, 8:].sum(-1) == 2).all())


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_mask_per_row_and_per_matrix(sparsity):
    s = torch.randn(12, 50, generator=torch.Generator().manual_seed(1))
    row = unstructured_mask(s, sparsity, per_row=True)
    assert bool(((~row).sum(1) == round(50 * sparsity)).all())
    mat = unstructured_mask(s, sparsity, per_row=False)
    assert int((~mat).sum()) == round(600 * sparsity)
    assert float(s[~mat].max()) <= float(s[mat].min())


def test_mask_ties_are_deterministic():
    s = torch.zeros(4, 8)  # all tied
    a = make_mask(s, 0.5, None, per_row=True)
    b = make_mask(s.clone(), 0.5, None, per_row=True)
    assert torch.equal(a, b) and int((~a).sum()) == 16


@pytest.mark.parametrize("levels", [None, 5])  # continuous scores (fast path) and heavy ties (tie rule)
def test_unstructured_mask_equals_stable_sort(levels):
    """Exactly the k lowest scores per row are pruned, ties broken by position like a stable sort."""
    g = torch.Generator().manual_seed(2)
    s = torch.rand(16, 40, generator=g)
    if levels:
        s = (s * levels).floor()
    k = 17
    mask = unstructured_mask(s, k / 40, per_row=True)
    order = torch.sort(s, dim=-1, stable=True).indices[:, :k]
    expected = torch.ones_like(mask).scatter_(1, order, False)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("nm", [(2, 4), (3, 6), (5, 7)])
def test_sparsegpt_nm_exact_when_m_does_not_divide_the_block(nm):
    """N:M groups are global (every M consecutive inputs from column 0), whatever prune.blocksize is."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(256, 60, generator=g)
    W = torch.randn(12, 60, generator=g)
    out = sparsegpt_prune(W, X.t() @ X, 0.5, nm, blocksize=16)
    assert check_nm(out, *nm)
    full = 60 - 60 % nm[1]
    kept = (out[:, :full] != 0).view(12, -1, nm[1]).sum(-1)
    assert bool((kept == nm[0]).all())


# ---- SparseGPT vs magnitude on the same layer and inputs ----
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstruction_error_below_magnitude(nm):
    g = torch.Generator().manual_seed(0)
    # correlated inputs with a few outlier channels, like LLM activations
    scale = torch.ones(256)
    scale[:4] = 20.0
    x = (torch.randn(4096, 256, generator=g) @ torch.randn(256, 256, generator=g) / 16 + torch.randn(4096, 256, generator=g)) * scale
    w = torch.randn(64, 256, generator=g)
    st = InputStats(256, hessian=True, sqnorm=True)
    st.add(x)
    w_sgpt = sparsegpt_prune(w, st.H, 0.5, nm)
    w_mag = w * make_mask(w.abs(), 0.5, nm, per_row=False)
    w_wanda = w * make_mask(w.abs() * st.sqnorm.sqrt(), 0.5, nm, per_row=True)
    e_sgpt, e_mag, e_wanda = (st.relative_error(w, v) for v in (w_sgpt, w_mag, w_wanda))
    assert e_sgpt < e_mag and e_sgpt < e_wanda
    assert float((w_sgpt == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    if nm:
        assert check_nm(w_sgpt, *nm)
    # the error from H matches the error measured directly on the inputs
    direct = float((x @ (w - w_sgpt).t()).norm() / (x @ w.t()).norm())
    assert e_sgpt == pytest.approx(direct, rel=1e-3)


# ---- the engine on tiny models of several families, no per-family code ----
@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_exact_sparsity_all_families(tiny_model, calib_ids, family, method, pattern):
    """Every family, Conv1D (GPT-2) and fused qkv / gate_up (Phi-3) included: every linear of every block
    is pruned, per output row for Wanda, N:M along the input dimension of the [out, in] weight."""
    model = tiny_model(family)
    cfg = prune_config(method=method, sparsity=0.5, pattern=pattern, **_sgpt(method))
    report = prune_model(model, None, cfg, calib_ids=calib_ids, progress=False)
    _, blocks = find_blocks(model)
    n = sum(len(target_linears(b, cfg)) for b in blocks)
    assert n >= 4 * len(blocks) and len(report.modules) == n and report.check["ok"]
    for block in blocks:
        for name, lin in target_linears(block, cfg).items():
            w = weight_matrix(lin)
            if pattern == "2:4":
                assert check_nm(w, 2, 4), name
                assert bool(((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()), name
            elif method == "wanda":  # per output row
                assert bool(((w == 0).sum(1) == w.shape[1] // 2).all()), name
            else:
                assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3), name
    assert report.achieved() == pytest.approx(0.5, abs=1e-3)
    # embeddings / lm_head untouched
    emb = model.get_input_embeddings().weight
    assert float((emb == 0).float().mean()) < 0.01


def test_conv1d_is_pruned_in_its_transposed_layout(tiny_model, calib_ids):
    """GPT-2's Conv1D stores [in, out]: Wanda's per-row budget and 2:4 groups apply to the [out, in] view,
    and the pruned layer's outputs match a Linear holding the same [out, in] weight."""
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("gpt2")
    prune_model(model, None, prune_config(method="wanda", pattern="2:4"), calib_ids=calib_ids, progress=False)
    conv = model.transformer.h[0].mlp.c_fc
    assert isinstance(conv, Conv1D) and conv.weight.shape == (64, 256)
    w = weight_matrix(conv)
    assert w.shape == (256, 64) and check_nm(w, 2, 4)
    assert not check_nm(conv.weight, 2, 4)  # the stored layout is not what the groups follow
    lin = torch.nn.Linear(64, 256)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(conv.bias)
        x = torch.randn(3, 64)
        assert torch.allclose(lin(x), conv(x), atol=1e-6)


def test_unhandled_weight_holders_are_refused_by_name(tiny_model, calib_ids):
    """A module inside a block that holds a weight matrix but is neither Linear nor Conv1D (here an
    Embedding) is refused, naming it, before any work; ignoring it explicitly prunes the rest."""
    from compress.core.errors import UnsupportedModelError

    model = tiny_model("llama")
    model.model.layers[1].mlp.table = torch.nn.Embedding(10, 64)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.mlp\.table \(Embedding: weight \[10, 64\]\)"):
        prune_model(model, None, prune_config(method="wanda"), calib_ids=calib_ids, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was touched
    r = prune_model(model, None, prune_config(method="magnitude", ignore=[r"mlp\.table"]), progress=False)
    assert r.check["ok"] and len(r.modules) == 14


def test_nothing_selected_is_refused(tiny_model):
    from compress.core.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"selects no module.*q_proj"):
        prune_model(tiny_model("llama"), None, prune_config(method="magnitude", targets=["c_attn"]), progress=False)


def test_a_target_the_forward_never_reaches_fails_the_stage(tiny_model, calib_ids):
    """A targeted linear that the calibration forward never calls is never pruned: the stage fails, naming
    it, and the report of what was done travels with the error."""
    from compress.core.errors import ShortfallError

    model = tiny_model("llama")
    model.model.layers[0].mlp.unused = torch.nn.Linear(64, 64)
    with pytest.raises(ShortfallError, match=r"pruned 14 of the 15 targeted modules.*0\.mlp\.unused") as e:
        prune_model(model, None, prune_config(method="wanda"), calib_ids=calib_ids, progress=False)
    assert e.value.result is not None and e.value.result.check["ok"] is False


def _zero_masks(model):
    return {n: (p == 0).clone() for n, p in model.named_parameters() if p.dim() == 2}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_identical_seeds_identical_masks(tiny_model, calib_ids, method):
    cfg = prune_config(method=method, sparsity=0.6, **_sgpt(method))
    a, b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    prune_model(a, None, cfg, calib_ids=calib_ids, progress=False)
    prune_model(b, None, cfg, calib_ids=calib_ids.clone(), progress=False)
    ma, mb = _zero_masks(a), _zero_masks(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offload_gives_same_masks(tiny_model, calib_ids, method):
    cfg = prune_config(method=method, sparsity=0.5, **_sgpt(method))
    a, b = tiny_model("mistral", seed=1), tiny_model("mistral", seed=1)
    prune_model(a, None, cfg, calib_ids=calib_ids, progress=False)
    cfg_off = prune_config(method=method, sparsity=0.5, offload=True, **_sgpt(method))
    prune_model(b, None, cfg_off, calib_ids=calib_ids, progress=False)
    ma, mb = _zero_masks(a), _zero_masks(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_sequential_mode_prunes_in_one_pass(tiny_model, calib_ids, family):
    """Sequential (greenlet) mode: exact sparsity, and the first linear's mask equals the two-pass one
    (its inputs are the same), while later linears see pruned inputs."""
    a, b = tiny_model(family, seed=2), tiny_model(family, seed=2)
    two = prune_model(a, None, prune_config(method="wanda", sparsity=0.5, sequential=False), calib_ids=calib_ids, progress=False)
    one = prune_model(b, None, prune_config(method="wanda", sparsity=0.5, sequential=True), calib_ids=calib_ids,
                      progress=False)
    assert one.achieved() == pytest.approx(0.5, abs=1e-3)
    first = two.modules[0]["name"].split(".", 1)[1]
    la = dict(a.named_modules())
    lb = dict(b.named_modules())
    _, blocks = find_blocks(a)
    pfx = [n for n, m in a.named_modules() if m is blocks[0]][0]
    assert torch.equal(la[f"{pfx}.{first}"].weight == 0, lb[f"{pfx}.{first}"].weight == 0)
    assert not all(torch.equal(x == 0, y == 0) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_statistics_pass_stops_after_last_linear(tiny_model, calib_ids, family, method):
    """The two-pass mode's statistics pass stops each batch (after the first) once every target linear
    has been fed: the statistics equal those of full forwards, and the block's tail runs only once."""
    from compress.calibration.stats import StatsCollector

    model = tiny_model(family, seed=4)
    cfg = prune_config(method=method, sparsity=0.5)
    inputs = capture_block_inputs(model, calib_ids, batch_size=2).block(1)
    _, blocks = find_blocks(model)
    block = blocks[1]
    linears = target_linears(block, cfg)
    hess, sq = method == "sparsegpt", method == "wanda"
    full = StatsCollector(linears, hess, sq, "cpu")
    full.forward_all(block, inputs)
    full.remove()
    early = StatsCollector(linears, hess, sq, "cpu")
    last = list(linears.values())[-1]
    out_calls = []
    h = last.register_forward_hook(lambda *a: out_calls.append(1))  # runs only when the linear itself runs
    early.collect_all(block, inputs)
    h.remove()
    early.remove()
    assert len(inputs) == 4 and len(out_calls) == 1  # the last linear computed its output for batch 0 only
    assert early.order == full.order
    for name in linears:
        a, b = full.stats[name], early.stats[name]
        assert a.tokens == b.tokens == calib_ids.numel()
        for x, y in [(a.sqnorm, b.sqnorm), (a._H, b._H)]:
            assert (x is None and y is None) or torch.equal(x, y)


def test_statistics_pass_runs_blocks_with_a_repeated_linear_in_full():
    """A block that calls a target linear twice per forward is never cut short."""
    from compress.calibration.blocks import BlockInputs
    from compress.calibration.stats import StatsCollector

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    cfg = prune_config(method="wanda", sparsity=0.5)
    block = Twice()
    inputs = BlockInputs([torch.randn(1, 4, 8) for _ in range(3)], [()] * 3, [{}] * 3)
    col = StatsCollector(target_linears(block, cfg), False, True, "cpu")
    col.collect_all(block, inputs)
    col.remove()
    assert col.stats["a"].tokens == 2 * 3 * 4 and col.stats["b"].tokens == 3 * 4


def test_owl_schedule_keeps_mean_sparsity(tiny_model, calib_ids):
    model = tiny_model("llama")
    cfg = prune_config(method="wanda", sparsity=0.5, schedule="owl", owl_lambda=0.1, owl_m=3)
    r = prune_model(model, None, cfg, calib_ids=calib_ids, progress=False)
    s = r.layer_sparsities
    assert len(s) == 2 and sum(s) / 2 == pytest.approx(0.5, abs=1e-9)
    assert max(s) - min(s) == pytest.approx(0.2, abs=1e-9)
    assert r.achieved() == pytest.approx(0.5, abs=2e-3)


def test_targets_and_ignore(tiny_model, calib_ids):
    model = tiny_model("llama")
    cfg = prune_config(method="magnitude", sparsity=0.5, ignore=[r"mlp\."])
    prune_model(model, None, cfg, progress=False)
    blk = model.model.layers[0]
    assert float((blk.self_attn.q_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert float((blk.mlp.up_proj.weight == 0).float().mean()) == 0.0


def test_global_magnitude(tiny_model):
    model = tiny_model("qwen2")
    r = prune_model(model, None, prune_config(method="magnitude", sparsity=0.5, scope="global"), progress=False)
    assert r.achieved() == pytest.approx(0.5, abs=1e-3)
    per_module = [m["achieved"] for m in r.modules]
    assert max(per_module) - min(per_module) > 0.01  # global threshold: modules differ


def test_save_reload_same_ppl(tiny_model, calib_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    prune_model(model, None, prune_config(method="sparsegpt", pattern="2:4", blocksize=32), calib_ids=calib_ids,
                progress=False)
    ids = torch.randint(0, 128, (256,), generator=torch.Generator().manual_seed(5))
    before = perplexity_from_ids(model, ids, 32, None, 2, progress=False)["ppl"]
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert (tmp_path / "m" / "model.safetensors").exists()
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    after = perplexity_from_ids(re, ids, 32, None, 2, progress=False)["ppl"]
    assert after == before
    assert check_nm(re.model.layers[1].mlp.down_proj.weight, 2, 4)


def test_corrected_target_is_least_squares():
    from compress.core.linalg import corrected_target

    g = torch.Generator().manual_seed(0)
    xd = torch.randn(512, 32, generator=g)
    xp = xd + 0.3 * torch.randn(512, 32, generator=g)
    w = torch.randn(16, 32, generator=g)
    v = corrected_target(w, xp.t() @ xp, xd.t() @ xp, percdamp=0.0)
    ref = torch.linalg.lstsq(xp, xd @ w.t()).solution.t()
    assert torch.allclose(v, ref, atol=1e-3)
    # it beats keeping W when inputs drift
    assert (xd @ w.t() - xp @ v.t()).norm() < (xd @ w.t() - xp @ w.t()).norm()


def test_error_correction_runs_and_reduces_drift(tiny_model, calib_ids):
    """Against the dense model's final hidden states, error-corrected SparseGPT drifts less."""
    dense = tiny_model("llama", seed=4)
    with torch.no_grad():
        ref = dense(calib_ids, output_hidden_states=True).hidden_states[-1]
    errs = {}
    for ec in (False, True):
        m = tiny_model("llama", seed=4)
        cfg = prune_config(method="sparsegpt", sparsity=0.6, sequential=True, error_correction=ec, blocksize=32)
        r = prune_model(m, None, cfg, calib_ids=calib_ids, progress=False)
        assert r.achieved() == pytest.approx(0.6, abs=2e-3)
        with torch.no_grad():
            errs[ec] = float((m(calib_ids, output_hidden_states=True).hidden_states[-1] - ref).norm())
    assert errs[True] < errs[False]


def test_block_reconstruction_keeps_masks_and_lowers_block_loss(tiny_model, calib_ids):
    model = tiny_model("qwen2", seed=5)
    cfg = prune_config(method="wanda", sparsity=0.6, sequential=True, reconstruct_epochs=3, reconstruct_lr=1e-3)
    ref = tiny_model("qwen2", seed=5)
    prune_model(ref, None, prune_config(method="wanda", sparsity=0.6, sequential=True), calib_ids=calib_ids,
                progress=False)
    r = prune_model(model, None, cfg, calib_ids=calib_ids, progress=False)
    assert len(r.blocks_reconstruction) == 2
    for b in r.blocks_reconstruction:
        assert b["loss_after"] < b["loss_before"]
    # same masks as without reconstruction in the first block (its inputs are identical), weights differ
    a = model.model.layers[0].self_attn.q_proj.weight
    b = ref.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(a == 0, b == 0) and not torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


def _target_masks(model):
    _, blocks = find_blocks(model)
    return {f"{i}.{n}": (m.weight == 0).clone() for i, b in enumerate(blocks) for n, m in target_linears(b, prune_config("wanda")).items()}


def test_dense_stats_is_the_only_switch_for_dense_statistics(tiny_model, calib_ids):
    """Reconstruction alone leaves block 0's masks as in the plain single pass (its statistics come from
    the pruned stream only); dense_stats=true adds the dense stream's inputs and changes some masks."""
    plain = tiny_model("llama", seed=6)
    prune_model(plain, None, prune_config(method="sparsegpt", sparsity=0.5, blocksize=32), calib_ids=calib_ids,
                progress=False)
    rec = tiny_model("llama", seed=6)
    r = prune_model(rec, None, prune_config(method="sparsegpt", sparsity=0.5, blocksize=32, reconstruct_epochs=1,
                                           reconstruct_lr=1e-3), calib_ids=calib_ids, progress=False)
    assert len(r.blocks_reconstruction) == 2
    mixed = tiny_model("llama", seed=6)
    prune_model(mixed, None, prune_config(method="sparsegpt", sparsity=0.5, blocksize=32, dense_stats=True),
                calib_ids=calib_ids, progress=False)
    mp, mr, mm = _target_masks(plain), _target_masks(rec), _target_masks(mixed)
    block0 = [k for k in mp if k.startswith("0.")]
    assert all(torch.equal(mp[k], mr[k]) for k in block0)
    # q/k/v of block 0 see identical dense and pruned inputs (H doubles, same mask); later linears differ
    assert torch.equal(mp["0.self_attn.q_proj"], mm["0.self_attn.q_proj"])
    assert any(not torch.equal(mp[k], mm[k]) for k in mp)
    assert sum(int(v.sum()) for v in mm.values()) == sum(int(v.sum()) for v in mp.values())


def test_dense_stats_config_is_validated():
    from compress.config import ConfigError

    for bad in (dict(method="sparsegpt", dense_stats=True, sequential=False),
                dict(method="magnitude", dense_stats=True),
                dict(method="sparsegpt", dense_stats=True, error_correction=True)):
        with pytest.raises(ConfigError, match="dense_stats"):
            prune_config(**bad)


def test_auto_mode_switches_at_the_memory_budget(tiny_model, calib_ids, monkeypatch):
    """prune.sequential=auto takes the single pass when its estimate fits memory_budget x free memory, the
    two-pass mode otherwise; the decision, both estimates and the budget are recorded."""
    from compress.calibration import loop

    cfg = dict(method="sparsegpt", sparsity=0.5, blocksize=32)
    big = prune_model(tiny_model("llama"), None, prune_config(**cfg), calib_ids=calib_ids, progress=False)
    mode = big.mode
    assert mode["requested"] == "auto" and mode["chosen"] == "single_pass"
    est = mode["estimate"]
    assert est["single_pass_mb"] > est["two_pass_mb"] > 0 and est["tokens"] == calib_ids.numel()
    assert mode["budget_mb"] == pytest.approx(0.5 * mode["free_mb"], rel=1e-3)
    # free memory just below what the single pass needs at budget 1.0: two passes
    free = est["single_pass_mb"] * 2**20 * 0.99
    monkeypatch.setattr(loop, "free_memory_bytes", lambda device: free)
    small_model = tiny_model("llama")
    small = prune_model(small_model, None, prune_config(**cfg, memory_budget=1.0), calib_ids=calib_ids,
                        progress=False)
    assert small.mode["chosen"] == "two_pass" and "exceed" in small.mode["reason"]
    # and just above it: the single pass
    free = est["single_pass_mb"] * 2**20 * 1.01
    fits = prune_model(tiny_model("llama"), None, prune_config(**cfg, memory_budget=1.0), calib_ids=calib_ids,
                       progress=False)
    assert fits.mode["chosen"] == "single_pass"
    # the two-pass result is the reference mode's (same masks as an explicit sequential=false)
    ref = tiny_model("llama")
    prune_model(ref, None, prune_config(**cfg, sequential=False), calib_ids=calib_ids, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(small_model.parameters(), ref.parameters()))
    # explicit overrides win over the budget, options that need the single pass force it
    forced = prune_model(tiny_model("llama"), None, prune_config(**cfg, sequential=True, memory_budget=1.0),
                         calib_ids=calib_ids, progress=False)
    assert forced.mode["chosen"] == "single_pass" and forced.mode["reason"] == "sequential=true"
    needs = prune_model(tiny_model("llama"), None, prune_config(**cfg, dense_stats=True, memory_budget=1.0),
                        calib_ids=calib_ids, progress=False)
    assert needs.mode["chosen"] == "single_pass" and "dense_stats" in needs.mode["reason"]


def test_auto_two_pass_equals_explicit_two_pass(tiny_model, calib_ids, monkeypatch):
    monkeypatch.setattr("compress.calibration.loop.free_memory_bytes", lambda device: 1.0)
    a, b = tiny_model("qwen2", seed=7), tiny_model("qwen2", seed=7)
    r = prune_model(a, None, prune_config(method="wanda", sparsity=0.5), calib_ids=calib_ids, progress=False)
    assert r.mode["chosen"] == "two_pass"
    prune_model(b, None, prune_config(method="wanda", sparsity=0.5, sequential=False), calib_ids=calib_ids,
                progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("value,expected", [(True, "true"), (False, "false"), ("auto", "auto"), ("True", "true")])
def test_sequential_values(value, expected):
    assert prune_config("wanda", sequential=value).sequential == expected


def test_sequential_and_budget_validated():
    from compress.config import ConfigError

    with pytest.raises(ConfigError, match="prune.sequential"):
        prune_config("wanda", sequential="sometimes")
    with pytest.raises(ConfigError, match="prune.memory_budget"):
        prune_config("wanda", memory_budget=1.5)

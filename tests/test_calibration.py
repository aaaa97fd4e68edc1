import pytest
import torch

from compress.calibration.blocks import block_outputs, capture_block_inputs, find_blocks
from compress.calibration.runner import run_sequential

from .conftest import ALL_FAMILIES, FAMILIES, PER_LAYER


@pytest.mark.parametrize("family", FAMILIES)
def test_find_blocks_without_family_code(tiny_model, family):
    model = tiny_model(family)
    name, blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert type(blocks[0]).__name__ in set(model._no_split_modules)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_block_by_block_replay_matches_full_forward(tiny_model, calib_ids, family, batch_size):
    """Captured inputs (with all kwargs) replayed block by block give the model's own hidden states."""
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(calib_ids, output_hidden_states=True).hidden_states
    cap = capture_block_inputs(model, calib_ids, batch_size=batch_size)
    assert len(cap) == -(-calib_ids.shape[0] // batch_size)
    assert torch.allclose(torch.cat(cap.hidden), ref[0], atol=1e-5)
    _, blocks = find_blocks(model)
    hidden = cap.hidden
    for i, block in enumerate(blocks[:-1]):  # the last hidden state is after the final norm
        hidden = block_outputs(block, cap.block(i, hidden))
        assert torch.allclose(torch.cat(hidden), ref[i + 1], atol=1e-4), f"block {i}"


def test_capture_records_kwargs(tiny_model, calib_ids):
    model = tiny_model("llama")
    cap = capture_block_inputs(model, calib_ids, batch_size=4)
    assert "position_embeddings" in cap.kwargs[0][0] and cap.nblocks == 2


def test_run_sequential_visits_every_block_once_offloaded(tiny_model, calib_ids):
    """With offload, each block is moved to the compute device just before it is processed and back to the
    CPU right after, in order, and no other block moves meanwhile (the moves are recorded: on a CPU-only
    machine every device is the CPU, so the devices alone would prove nothing)."""
    model = tiny_model("qwen2")
    _, blocks = find_blocks(model)
    moves, seen = [], []
    for i, b in enumerate(blocks):
        orig = b.to

        def to(*args, _i=i, _orig=orig, **kw):
            moves.append((_i, str(args[0] if args else kw.get("device"))))
            return _orig(*args, **kw)

        b.to = to

    def process(i, block, inputs, dense):
        seen.append(i)
        assert moves[-1] == (i, "cpu")  # just onloaded to the compute device (the CPU here)
        moves.append(("processed", i))

    run_sequential(model, calib_ids, process, batch_size=4, device="cpu", offload=True, progress=False)
    assert seen == [0, 1]
    # the walk (after the capture's one-probe forward, which onloads each block in turn too)
    assert moves[-6:] == [(0, "cpu"), ("processed", 0), (0, "cpu"), (1, "cpu"), ("processed", 1), (1, "cpu")]
    assert moves[:4] == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _model_states(model, ids):
    """The model's own block inputs (output_hidden_states) and every block's output; the last hidden state
    that output_hidden_states returns is after the final norm, so block outputs come from forward hooks."""
    _, blocks = find_blocks(model)
    outs = []
    hs = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)) for b in blocks]
    with torch.no_grad():
        states = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    for h in hs:
        h.remove()
    for i in range(len(blocks) - 1):
        assert torch.equal(outs[i], states[i + 1])
    return states, outs


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_replay_equals_the_model_in_every_family(tiny_model, calib_ids, family):
    """Block-by-block replay through compress.calibration reproduces the model's own hidden states
    (output_hidden_states for every block's input, a forward hook for the last block's output) within 1e-5
    relative in fp32, for families with per-layer attention types too."""
    model = tiny_model(family)
    _, blocks = find_blocks(model)
    states, outs = _model_states(model, calib_ids)
    cap = capture_block_inputs(model, calib_ids, batch_size=3)
    hidden = cap.hidden
    assert _rel(torch.cat(hidden), states[0]) <= 1e-5
    for i, block in enumerate(blocks):
        hidden = block_outputs(block, cap.block(i, hidden))
        assert _rel(torch.cat(hidden), outs[i]) <= 1e-5, f"block {i}"


@pytest.mark.parametrize("family", PER_LAYER)
def test_per_layer_families_really_get_different_arguments(tiny_model, calib_ids, family):
    """The per-layer families' blocks receive different masks (the sliding window of 8 is shorter than the
    32-token sequences), and replaying block 0's arguments to every block (the old behaviour) is wrong."""
    model = tiny_model(family)
    cap = capture_block_inputs(model, calib_ids, batch_size=4)
    assert "attention_mask" in cap.per_block_keys()
    _, blocks = find_blocks(model)
    _, outs = _model_states(model, calib_ids)
    hidden, errs = cap.hidden, []
    for i, block in enumerate(blocks):
        hidden = block_outputs(block, cap.block(0, hidden))  # block 0's arguments everywhere
        errs.append(_rel(torch.cat(hidden), outs[i]))
    assert max(errs) > 1e-2


def test_block_arguments_computed_from_earlier_blocks_are_refused(calib_ids):
    """A model that derives a block's arguments from the previous block's output cannot be replayed from
    arguments recorded once: it is refused by name instead of calibrated on wrong activations."""
    from types import SimpleNamespace

    from compress.core.errors import UnsupportedModelError

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, h, scale=None):
            return h + self.fc(h) * scale

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(use_cache=False)
            self.emb = torch.nn.Embedding(128, 8)
            self.layers = torch.nn.ModuleList([Block() for _ in range(3)])

        def forward(self, input_ids, use_cache=False):
            h = self.emb(input_ids)
            for layer in self.layers:
                h = layer(h, scale=h.mean(-1, keepdim=True))
            return h

    with pytest.raises(UnsupportedModelError, match="depend on what earlier blocks compute"):
        capture_block_inputs(Toy(), calib_ids, batch_size=4)


@pytest.mark.parametrize("family", ["llama", "llama_mha", "gemma3", "phi3", "cohere2", "opt", "qwen2"])
def test_coupled_groups_fold_leaves_the_model_unchanged(tiny_model, calib_ids, family):
    """The coupled-module map from the roles (norm -> q/k/v, v -> o without GQA, norm -> gate/up, up -> down):
    found by tracing, never by family; folding random positive scales into every group of every block leaves
    the float model's logits unchanged (1e-5 relative, fp32). Gemma's norms (x * (1 + w)) are probed as such;
    Cohere's one norm feeding attention and MLP makes one group."""
    import transformers as T

    from compress.calibration.roles import block_structure, coupled_groups

    if family == "llama_mha":
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(T.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                                 num_attention_heads=4, num_key_value_heads=4,
                                                                 intermediate_size=128)).eval()
    else:
        model = tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms (random weights), so that a wrong fold shows
            if p.dim() == 1:
                p.add_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
        ref = model(input_ids=calib_ids[:2]).logits
    st = block_structure(model)
    _, blocks = find_blocks(model)
    cap = capture_block_inputs(model, calib_ids[:1])
    names = []
    g = torch.Generator().manual_seed(1)
    for b, block in zip(st.blocks, blocks):
        groups = coupled_groups(block, b, cap.block(b.index))
        names.append(sorted(c.name for c in groups))
        for c in groups:
            c.fold(torch.rand(c.width, generator=g) * 2 + 0.25)
    with torch.no_grad():
        out = model(input_ids=calib_ids[:2]).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    expected = {"llama": ["attn_in", "mlp_in", "mlp_out"], "llama_mha": ["attn_in", "attn_out", "mlp_in", "mlp_out"],
                "gemma3": ["attn_in", "mlp_in", "mlp_out"], "phi3": ["attn_in", "mlp_in", "mlp_out"],
                "cohere2": ["attn_in+mlp_in", "mlp_out"], "opt": ["attn_in", "attn_out", "mlp_in"],
                "qwen2": ["attn_in", "mlp_in", "mlp_out"]}[family]
    assert names[0] == expected
    if family == "gemma3":  # the MLP's norm is pre_feedforward_layernorm, found by the trace, with offset 1
        mlp = next(c for c in coupled_groups(blocks[0], st.blocks[0], cap.block(0)) if c.name == "mlp_in")
        assert mlp.producer_name == "pre_feedforward_layernorm" and mlp.norm_offset == 1.0

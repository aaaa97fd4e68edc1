import pytest
import torch

from compress.calibration import block_outputs, capture_block_inputs, find_blocks, run_sequential

from .conftest import FAMILIES


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
    inputs = capture_block_inputs(model, calib_ids, batch_size=batch_size)
    assert len(inputs) == -(-calib_ids.shape[0] // batch_size)
    assert torch.allclose(torch.cat(inputs.hidden), ref[0], atol=1e-5)
    _, blocks = find_blocks(model)
    for i, block in enumerate(blocks[:-1]):  # the last hidden state is after the final norm
        inputs = inputs.with_hidden(block_outputs(block, inputs))
        assert torch.allclose(torch.cat(inputs.hidden), ref[i + 1], atol=1e-4), f"block {i}"


def test_capture_records_kwargs(tiny_model, calib_ids):
    model = tiny_model("llama")
    inputs = capture_block_inputs(model, calib_ids, batch_size=4)
    assert "position_embeddings" in inputs.kwargs[0]


def test_run_sequential_visits_every_block_once_offloaded(tiny_model, calib_ids):
    model = tiny_model("qwen2")
    seen = []

    def process(i, block, inputs, dense):
        assert next(block.parameters()).device.type == "cpu"
        seen.append(i)

    run_sequential(model, calib_ids, process, batch_size=4, offload=True, progress=False)
    assert seen == [0, 1]

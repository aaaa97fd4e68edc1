"""The benchmark baseline ``benchmarks/reference_port.py`` (the reference code's loop, rewritten) must
do what our reference-behaviour mode does, or the speed ratios against it mean nothing."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from compress.calibration import find_blocks
from compress.config import CalibConfig, PruneConfig, parse_pattern
from compress.pruning import prune_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_port import prune_reference_style  # noqa: E402


def _weights(model):
    _, blocks = find_blocks(model)
    return [m.weight.detach() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("wanda", "2:4"), ("magnitude", "4:8"),
                                            ("sparsegpt", "2:4"), ("sparsegpt", "unstructured")])
def test_port_matches_reference_mode(tiny_model, calib_ids, method, pattern):
    a = tiny_model("llama", seed=3)
    b = copy.deepcopy(a)
    prune_reference_style(a, calib_ids, method, 0.5, parse_pattern(pattern))
    prune_model(b, None, PruneConfig(method=method, sparsity=0.5, pattern=pattern, sequential=False),
                CalibConfig(batch_size=1), calib_ids=calib_ids, progress=False)
    wa, wb = _weights(a), _weights(b)
    agree = sum(int(((x == 0) == (y == 0)).sum()) for x, y in zip(wa, wb)) / sum(x.numel() for x in wa)
    if method == "sparsegpt" and pattern == "unstructured":
        # the reference thresholds with `<=` inside each column block (ties prune a few extra weights)
        # and inverts H differently: masks agree almost everywhere
        assert agree > 0.995
    else:
        assert agree == 1.0
        tol = 1e-4 if method == "sparsegpt" else 0.0
        assert all(torch.allclose(x, y, atol=tol, rtol=0) for x, y in zip(wa, wb))

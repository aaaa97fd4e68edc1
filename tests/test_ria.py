"""RIA: the score against its closed form on a small matrix, exact unstructured and N:M sparsity on tiny models of
several families, and the method through the CLI (registered from its own module: option, keys, label)."""

import subprocess
import sys

import pytest
import torch

from compress.calibration.stats import InputStats
from compress.calibration.targets import resolve_targets
from compress.config import label, prune_config
from compress.core.errors import ConfigError
from compress.core.masks import check_nm
from compress.core.modules import weight_matrix
from compress.pruning.ria import ria_scores
from compress.stages.prune import prune_model


def test_score_is_the_closed_form():
    """RIA_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||^a, element by element."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=g)
    X = torch.randn(10, 4, generator=g)
    stats = InputStats(4, hessian=False, sqnorm=True)
    stats.add(X)
    got = ria_scores(W, stats.sqnorm, 0.5)
    for i in range(3):
        for j in range(4):
            col = sum(abs(float(W[k, j])) for k in range(3))
            row = sum(abs(float(W[i, k])) for k in range(4))
            xnorm = sum(float(X[t, j]) ** 2 for t in range(10)) ** 0.5
            want = (abs(float(W[i, j])) / col + abs(float(W[i, j])) / row) * xnorm ** 0.5
            assert float(got[i, j]) == pytest.approx(want, rel=1e-5)
    assert torch.equal(ria_scores(W, stats.sqnorm, 0.0), ria_scores(W, torch.ones(4), 1.0))  # a=0: RI alone


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "phi3"])
@pytest.mark.parametrize("pattern,scope", [("unstructured", "layer"), ("unstructured", "row"), ("2:4", "layer")])
def test_exact_sparsity(tiny_model, calib_ids, family, pattern, scope):
    model = tiny_model(family)
    r = prune_model(model, None, prune_config("ria", sparsity=0.5, pattern=pattern, scope=scope), calib_ids=calib_ids,
                    progress=False)
    assert r.check["ok"] and len(r.modules) == len(resolve_targets(model).flat())
    for lin in resolve_targets(model).flat().values():
        w = weight_matrix(lin)
        if pattern == "2:4":
            assert check_nm(w, 2, 4) and bool(((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all())
        elif scope == "row":
            assert bool(((w == 0).sum(1) == w.shape[1] // 2).all())
        else:
            assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_the_method_is_registered_from_its_module(tmp_path):
    """Nothing but compress/pruning/ria.py names it: a Hydra option with its own keys, refused keys of others,
    compare's label."""
    with pytest.raises(ConfigError, match="prune.scope='global' is not valid"):
        prune_config("ria", scope="global")
    with pytest.raises(ConfigError, match="prune.a is not a key of prune=wanda"):
        prune_config("wanda", a=0.5)
    assert label("prune", {"method": "ria", "sparsity": 0.5}) == "ria 0.5"
    p = subprocess.run([sys.executable, "-m", "compress", "prune=ria", "prune.a=-1", f"hydra.run.dir={tmp_path}/r"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and "prune.a=-1" in p.stderr
    p = subprocess.run([sys.executable, "-m", "compress", "list"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "ria " in p.stdout and "Relative importance" in p.stdout

"""Calibration across processes: 2 ranks (gloo, one thread each) started by torchrun and by accelerate launch.
Each rank takes half of the calibration samples, the statistics are summed over ranks, the linears are
split between them and every result is broadcast: all ranks end with bitwise equal weights (checked by
the run itself and recorded), rank 0 alone writes, and the result matches one process up to the order of
the sums."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import save_tiny

SMALL = ["calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2", "output.save_model=true"]
CASES = {"sparsegpt": ["prune=sparsegpt", "prune.sparsity=0.5"],
         "sparsegpt_two_pass": ["prune=sparsegpt", "prune.sparsity=0.5", "prune.sequential=false"],
         "wanda": ["prune=wanda", "prune.sparsity=0.5"],
         "gptq": ["quant=gptq", "quant.bits=4", "quant.group_size=32"],
         # block transforms and activation ranges: their statistics must cover every rank's samples
         "smoothquant_gptq_w8a8_static": ["quant=gptq", "quant.scheme=w8a8_static", "transform=smoothquant",
                                          "transform.search=true", "transform.grid=4"],
         "awq_rtn": ["quant=rtn", "quant.bits=4", "quant.group_size=32", "transform=awq"],
         "rotation_gptq_w4a8": ["quant=gptq", "quant.scheme=w4a8", "quant.group_size=32", "transform=rotation"]}
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _torchrun(args, cwd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), "-m", "compress", *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env=ENV)


def _weights(run):
    d = run / "model"
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    return base, save_tiny("llama", base / "llama", layers=3)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_agree_with_each_other_and_with_one_process(tiny, case):
    base, ckpt = tiny
    one, two = base / f"{case}-1", base / f"{case}-2"
    args = ["model=hf", f"model.name={ckpt}", *CASES[case], *SMALL]
    p = subprocess.run([sys.executable, "-m", "compress", *args, f"hydra.run.dir={one}"], capture_output=True,
                       text=True, timeout=600, cwd=base, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    p = _torchrun([*args, f"hydra.run.dir={two}"], base)
    assert p.returncode == 0, p.stderr[-3000:]
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    dist = r2["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and dist["launcher"] == "torchrun"
    assert dist["ranks_equal"] is True and len(set(dist["rank_weights_sha256"])) == 1
    assert "distributed" not in r1
    (ds, ppl1), = r1["metrics"]["ppl"].items()
    assert abs(r2["metrics"]["ppl"][ds] / ppl1 - 1) < 2e-3
    w1, w2 = _weights(one), _weights(two)
    if any(k.endswith("weight_packed") for k in w1):  # packed codes (8 per int32): the share of identical words
        lin = [k for k in w1 if k.endswith("weight_packed")]
        same = sum(int((w1[k] == w2[k]).sum()) for k in lin)
    elif case.startswith("smoothquant"):  # int8 codes
        lin = [k for k in w1 if k.endswith("proj.weight")]
        assert all(w1[k].dtype == torch.int8 for k in lin)
        same = sum(int((w1[k] == w2[k]).sum()) for k in lin)
    else:  # the masks
        lin = [k for k in w1 if k.endswith("proj.weight")]
        same = sum(int(((w1[k] == 0) == (w2[k] == 0)).sum()) for k in lin)
    total = sum(w1[k].numel() for k in lin)
    assert lin and same / total >= 0.999
    assert not list(two.glob(".hydra-rank*"))  # rank 1 wrote nothing of its own


def test_accelerate_launch_starts_two_ranks(tiny):
    """`accelerate launch --multi_gpu --num_processes 2` starts two processes on a machine without a GPU (plain
    `--cpu --num_processes 2` starts one): the record must say two."""
    if shutil.which("accelerate") is None:
        pytest.fail("accelerate's launcher is not installed (accelerate is a core dependency)")
    base, ckpt = tiny
    run = base / "accelerate"
    p = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                        str(30500 + os.getpid() % 1000), "-m", "compress", "model=hf", f"model.name={ckpt}",
                        *CASES["sparsegpt"], *SMALL, f"hydra.run.dir={run}"], capture_output=True, text=True,
                       timeout=900, cwd=base, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    dist = json.loads((run / "results.json").read_text())["distributed"]
    assert dist["world_size"] == 2 and dist["ranks_equal"] is True


def test_structured_activation_importance_over_two_ranks_removes_the_same_units(tiny):
    """The activation importance is scored from moments summed over the ranks: the same heads and channels are
    removed as in one process (parameter counts equal), every rank ends equal, ppl within 0.2%."""
    base, ckpt = tiny
    args = ["model=hf", f"model.name={ckpt}", "prune=structured", "prune.importance=activation", "prune.ratio=0.2",
            *SMALL]
    one, two = base / "structured-1", base / "structured-2"
    p = subprocess.run([sys.executable, "-m", "compress", *args, f"hydra.run.dir={one}"], capture_output=True,
                       text=True, timeout=600, cwd=base, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    p = _torchrun([*args, f"hydra.run.dir={two}"], base)
    assert p.returncode == 0, p.stderr[-3000:]
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["distributed"]["ranks_equal"] is True and r2["distributed"]["world_size"] == 2
    dense = sum(t.numel() for f in ckpt.glob("*.safetensors") for t in load_file(str(f)).values())
    assert r2["metrics"]["params_total"] == r1["metrics"]["params_total"] < 0.9 * dense
    (ds, ppl1), = r1["metrics"]["ppl"].items()
    assert abs(r2["metrics"]["ppl"][ds] / ppl1 - 1) < 2e-3


def test_what_needs_one_process_is_refused_with_two(tiny):
    """An importance scored from block outputs (block) would differ between ranks: refused, naming it."""
    base, ckpt = tiny
    run = base / "refused"
    p = _torchrun(["model=hf", f"model.name={ckpt}", "prune=structured", "prune.importance=block", "prune.ratio=0.34",
                   *SMALL, f"hydra.run.dir={run}"], base)
    assert p.returncode != 0
    assert "the prune stage cannot run so: prune.importance=block scores from block outputs or training" in p.stderr
    assert not (run / "results.json").exists()


def test_the_rank_check_sees_parameters_outside_the_compressed_linears():
    """What the ranks compare: the compressed linears' fingerprint missed a norm folded differently on one
    rank (how SmoothQuant and AWQ once diverged across ranks); the whole state dict's hash sees it."""
    from compress.calibration.targets import resolve_targets
    from compress.core.modules import weights_fingerprint
    from compress.experiment import _state_sha256

    from .conftest import _tiny

    model = _tiny("llama")
    names = resolve_targets(model).qualified_names()
    before = (weights_fingerprint(model, names)["sha256"], _state_sha256(model))
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] *= 1.0 + 2**-20
    after = (weights_fingerprint(model, names)["sha256"], _state_sha256(model))
    assert after[0] == before[0] and after[1] != before[1]

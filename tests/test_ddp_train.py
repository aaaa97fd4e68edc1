"""The trainer under DDP: 2 ranks (gloo) started by torchrun and by accelerate launch run recovery training
after pruning. The loss curve equals a one-process run with the same global batch (micro batch x ranks)
within 1e-3 relative per step, masks stay exact, rank 0 alone writes, and a run killed after its step-3
checkpoint resumes onto the uninterrupted curve."""

import csv
import json
import os
import subprocess
import sys

import pytest

from .conftest import save_tiny

ENV = dict(os.environ, OMP_NUM_THREADS="1")
BASE = ["prune=wanda", "prune.sparsity=0.5", "train.max_steps=6", "train.log_every=1", "train.seqlen=64",
        "calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2"]


def _port():
    return str(29000 + os.getpid() % 1000)


def _losses(run):
    data = json.loads((run / "results.json").read_text())
    return data, [h["loss"] for h in data["train_history"] if "loss" in h]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    return base, save_tiny("llama", base / "llama", layers=2)


@pytest.mark.parametrize("launcher,method", [("torchrun", "lora"), ("torchrun", "full"), ("accelerate", "lora")])
def test_ddp_curve_equals_one_process_with_the_same_global_batch(tiny, method, launcher):
    base, ckpt = tiny
    args = ["model=hf", f"model.name={ckpt}", *BASE, f"train={method}"]
    one, two = base / f"{method}-{launcher}-1", base / f"{method}-{launcher}-2"
    p = subprocess.run([sys.executable, "-m", "compress", *args, "train.micro_batch_size=4", f"hydra.run.dir={one}"],
                       capture_output=True, text=True, timeout=600, cwd=base, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port()]
    else:
        cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", _port()]
    p = subprocess.run([*cmd, "-m", "compress", *args, "train.micro_batch_size=2", f"hydra.run.dir={two}"],
                       capture_output=True, text=True, timeout=900, cwd=base, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    d1, l1 = _losses(one)
    d2, l2 = _losses(two)
    assert d2["distributed"]["world_size"] == 2 and d2["distributed"]["backend"] == "gloo"
    assert d2["distributed"]["ranks_equal"] is True
    assert len(l1) == len(l2) == 6
    assert max(abs(a / b - 1) for a, b in zip(l1, l2)) < 1e-3
    assert d2["metrics"]["sparsity"] == d1["metrics"]["sparsity"] == 0.5
    check = d2["sparsity_check"]
    assert check.get("pruned_weights_still_zero") is True
    rows = list(csv.DictReader(open(two / "train_log.csv")))
    assert len(rows) == 6  # one writer: rank 0


KILL_AFTER_SAVE = r"""
import os, signal, sys
import compress.training as T
orig = T.Trainer.save_checkpoint
def save(self, path):
    orig(self, path)
    if int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
T.Trainer.save_checkpoint = save
from compress.cli import main
main(sys.argv[1:])
"""


def test_ddp_run_killed_after_a_checkpoint_resumes_onto_the_same_curve(tiny):
    base, ckpt = tiny
    args = ["model=hf", f"model.name={ckpt}", *BASE, "train=lora", "train.micro_batch_size=2", "train.save_every=3"]
    tr = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port()]
    ref = base / "resume-ref"
    p = subprocess.run([*tr, "-m", "compress", *args, f"hydra.run.dir={ref}"], capture_output=True, text=True,
                       timeout=900, cwd=base, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    run = base / "resume-killed"
    script = base / "kill_after_save.py"
    script.write_text(KILL_AFTER_SAVE)
    p = subprocess.run([*tr, str(script), *args, f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=900,
                       cwd=base, env=ENV)
    assert p.returncode != 0
    step3 = run / "checkpoints" / "step-3"
    assert (step3 / "trainer.json").exists()
    p = subprocess.run([*tr, "-m", "compress", *args, f"train.resume={step3}", f"hydra.run.dir={run}"],
                       capture_output=True, text=True, timeout=900, cwd=base, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    _, lr = _losses(ref)
    _, lk = _losses(run)
    assert len(lk) == 6 and max(abs(a / b - 1) for a, b in zip(lr, lk)) < 1e-3


def test_fsdp_on_cpu_is_refused_naming_what_to_launch_instead(tiny):
    """On CPU accelerate runs an FSDP config as plain DDP (FSDP2) or fails (FSDP1): refused before loading."""
    base, ckpt = tiny
    run = base / "fsdp"
    p = subprocess.run(["accelerate", "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                        _port(), "-m", "compress", "model=hf", f"model.name={ckpt}", *BASE, "train=full",
                        f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=600, cwd=base, env=ENV)
    assert p.returncode != 0
    assert "FSDP needs CUDA here" in p.stderr and "accelerate launch --multi_gpu" in p.stderr
    assert not (run / "results.json").exists()

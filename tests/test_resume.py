"""Resume after a crash: a run killed with SIGKILL (during a block, while a checkpoint is written, while the
model is saved) and started again with the same command ends with the same weights as an uninterrupted
run, recomputing at most the block it was in; a restart with a changed key is refused, naming it.

The kills are injected by a small wrapper around the CLI (test-only): it patches one function to SIGKILL
its own process on its n-th call, then runs ``compress`` with the given overrides.
"""

import json
import subprocess
import sys

import pytest

from .conftest import save_tiny

KILLER = r"""
import os, signal, sys
where, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def killing(orig, after=False):
    def f(*a, **k):
        calls[0] += 1
        if calls[0] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        out = orig(*a, **k)
        if calls[0] == n and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return f

import compress.calibration.checkpoint as C
import compress.stages.engine as E
import compress.stages.quant as Q
if where == "block":  # before the n-th linear's step (one job per linear): inside a block, some linears done
    E.LinearJob = killing(E.LinearJob)
elif where == "checkpoint":  # inside the n-th checkpoint file write: its temporary file written, not renamed
    orig = C.save_file
    def half(tensors, path, metadata=None):
        calls[0] += 1
        orig(tensors, path, metadata=metadata)
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    C.save_file = half
elif where == "save":  # the packed checkpoint written into its temporary directory, not yet renamed
    Q.save_compressed_tensors = killing(Q.save_compressed_tensors, after=True)
from compress.cli import main
main(sys.argv[3:])
"""

BLOCKS = 4
SMALL = ["calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2"]
RUN = ["prune=sparsegpt", "prune.sparsity=0.5", "quant=gptq", "quant.bits=4", "quant.group_size=32",
       "output.save_model=true", *SMALL]


def _run(args, cwd, where=None, n=0):
    cmd = [sys.executable, "-c", KILLER, where or "none", str(n), *args] if where else \
        [sys.executable, "-m", "compress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def tiny_and_reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    ckpt = save_tiny("llama", base / "llama", layers=BLOCKS)
    ref = base / "ref"
    p = _run(["model=hf", f"model.name={ckpt}", *RUN, f"hydra.run.dir={ref}"], base)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((ref / "results.json").read_text())
    assert not (ref / "checkpoint").exists()  # deleted once the run ended ok
    return base, ckpt, data


def _save(data):
    return next(s for s in data["stages"] if s["name"] == "save")


@pytest.mark.parametrize("where,n,stage,at", [
    ("block", 10, "prune", 1),  # 7 target linears per block: the 10th is in block 1
    ("checkpoint", 5, "prune", 2),  # prune block 2's files: blocks 0 and 1 finished
    ("block", 4 * 7 + 16, "quant", 2),  # quant, inside block 2 (prune all done)
    ("save", 1, None, None),  # every stage finished, the packed checkpoint not yet in place
])
def test_a_killed_run_resumes_to_the_same_weights(tiny_and_reference, where, n, stage, at):
    base, ckpt, ref = tiny_and_reference
    run = base / f"killed-{where}-{n}"
    args = ["model=hf", f"model.name={ckpt}", *RUN, f"hydra.run.dir={run}"]
    p = _run(args, base, where, n)
    assert p.returncode == -9, (p.returncode, p.stderr[-3000:])
    assert not (run / "model").exists()  # nothing half-saved under the final name
    finished = {}
    for d in (run / "checkpoint").iterdir():
        if (d / "state.json").exists():
            finished[d.name] = json.loads((d / "state.json").read_text())["done"] + 1
    p = _run(args, base)  # the same command again
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((run / "results.json").read_text())
    assert data["resume"]["resumed"] is True and data["resume"]["finished_blocks"] == finished
    assert _save(data)["fingerprint"]["sha256"] == _save(ref)["fingerprint"]["sha256"]
    assert data["metrics"]["ppl"] == ref["metrics"]["ppl"]
    entries = {s["name"]: s for s in data["stages"]}
    if stage is not None:  # recomputed: only from the block that was in progress
        assert finished[stage] == at
        assert entries[stage]["resumed_at_block"] == at
    if stage == "quant" or where == "save":  # the prune stage was restored whole, nothing recomputed
        assert entries["prune"]["resumed_at_block"] == BLOCKS
    if where == "save":
        assert entries["quant"]["resumed_at_block"] == BLOCKS
    assert not (run / "checkpoint").exists()


def test_a_resume_with_a_changed_key_is_refused_naming_it(tiny_and_reference):
    base, ckpt, _ = tiny_and_reference
    run = base / "changed"
    args = ["model=hf", f"model.name={ckpt}", *RUN, f"hydra.run.dir={run}"]
    assert _run(args, base, "block", 10).returncode == -9
    changed = [a if a != "prune.sparsity=0.5" else "prune.sparsity=0.6" for a in args]
    p = _run(changed, base)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "prune.sparsity: 0.5 -> 0.6" in p.stderr and "refusing to resume" in p.stderr
    assert (run / "checkpoint" / "prune" / "state.json").exists()  # the checkpoint is left as it was

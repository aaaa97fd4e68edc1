"""Models on disk (model.load=disk): built on the meta device, each block read from the checkpoint when its
turn comes, compressed, written to the output shards and freed. The result must equal the in-memory run
bit for bit, hold at most one block in memory at a time, reload with stock from_pretrained, and resume
after a kill like the in-memory walk."""

import json
import subprocess
import sys

import pytest
import torch

from compress.calibration.blocks import find_blocks
from compress.calibration.onload import CheckpointReader, DiskBlocks, ShardWriter, skeleton
from compress.calibration.runner import BlockResult, run_sequential
from compress.calibration.blocks import block_outputs

from .conftest import save_tiny
from .test_resume import KILLER

SMALL = ["calib.nsamples=4", "calib.seqlen=64", "eval.seqlen=64", "eval.max_windows=2", "output.save_model=true"]
CASES = {
    "sparsegpt": ["prune=sparsegpt", "prune.sparsity=0.5"],
    "wanda_gptq": ["prune=wanda", "prune.sparsity=0.5", "quant=gptq", "quant.bits=4", "quant.group_size=32"],
    "magnitude_rtn": ["prune=magnitude", "prune.sparsity=0.5", "quant=rtn", "quant.bits=4", "quant.group_size=32"],
}


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def _save_entry(run):
    data = json.loads((run / "results.json").read_text())
    return data, next(s for s in data["stages"] if s["name"] == "save")


@pytest.mark.parametrize("family,case", [("llama", c) for c in CASES] + [("qwen2", "sparsegpt"),
                                                                         ("gemma3", "wanda_gptq")])
def test_disk_run_equals_the_in_memory_run_and_reloads_stock(tmp_path, family, case):
    """Same weights (sha256 over every target linear), same perplexity to the last digit, stock reload
    verified; the disk run's shards are one per block plus one per tensor outside the blocks."""
    ckpt = save_tiny(family, tmp_path / family, layers=4)
    out = {}
    for load in ("memory", "disk"):
        run = tmp_path / load
        p = _cli(["model=hf", f"model.name={ckpt}", f"model.load={load}", *CASES[case], *SMALL,
                  f"hydra.run.dir={run}"], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        out[load] = _save_entry(run)
    (mem, mem_save), (disk, disk_save) = out["memory"], out["disk"]
    assert disk["stages"][0]["load"]["mode"] == "disk" and mem["stages"][0]["load"]["mode"] == "memory"
    assert disk_save["fingerprint"]["sha256"] == mem_save["fingerprint"]["sha256"]
    assert disk_save["fingerprint"]["zeros"] == mem_save["fingerprint"]["zeros"]
    assert disk["metrics"]["ppl"] == mem["metrics"]["ppl"]
    assert disk["metrics"]["sparsity"] == mem["metrics"]["sparsity"] >= 0.5
    assert disk["metrics"]["params_total"] == mem["metrics"]["params_total"]
    assert disk_save["reload"]["ok"] is True
    index = json.loads((tmp_path / "disk" / "model" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 4 + len([n for n in index["weight_map"] if not n.startswith("model.layers.")])
    assert not (tmp_path / "disk" / "work").exists() and not (tmp_path / "disk" / "checkpoint").exists()


def test_one_block_in_memory_at_a_time(tmp_path):
    """While the walk runs, every block but the one being processed is on the meta device."""
    ckpt = save_tiny("llama", tmp_path / "llama", layers=5)
    model = skeleton(ckpt, torch.float32)
    name, blocks = find_blocks(model)
    assert all(p.is_meta for p in model.parameters())
    store = DiskBlocks(model, CheckpointReader(ckpt), name, torch.float32, ShardWriter(tmp_path / "out", 5 + 3))
    seen = []

    def process(idx, block, inputs, dense):
        real = [i for i, b in enumerate(blocks) if not next(b.parameters()).is_meta]
        seen.append(real)
        return BlockResult(outputs=block_outputs(block, inputs))

    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    run_sequential(model, ids, process, device="cpu", store=store, progress=False)
    assert seen == [[i] for i in range(5)]
    assert all(p.is_meta for p in model.parameters())  # embeddings freed after the capture too
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"model-{k:05d}-of-00008.safetensors"
                                                                   for k in range(1, 6)]


def test_disk_mode_refuses_what_needs_the_whole_model_before_loading(tmp_path):
    ckpt = save_tiny("llama", tmp_path / "llama", layers=2)
    for extra, needle in ((["train=lora"], "the train stage needs the whole model in memory"),
                          (["prune=sparsegpt", "prune.schedule=owl"], "prune.schedule=owl"),
                          (["prune=magnitude", "prune.scope=global"], "prune.scope=global"),
                          (["quant=bnb"], "needs the model in memory"),
                          (["prune=wanda", "eval.speed=true"], "eval.zero_shot and eval.speed")):
        run = tmp_path / f"r{len(needle)}"
        p = _cli(["model=hf", f"model.name={ckpt}", "model.load=disk", *extra, *SMALL, f"hydra.run.dir={run}"], tmp_path)
        assert p.returncode == 2, (extra, p.stderr[-2000:])
        assert needle in p.stderr, (extra, p.stderr[-2000:])
        assert not (run / "results.json").exists()


def test_disk_run_killed_in_a_block_resumes_to_the_same_weights(tmp_path):
    ckpt = save_tiny("llama", tmp_path / "llama", layers=4)
    args = ["model=hf", f"model.name={ckpt}", *CASES["wanda_gptq"], *SMALL]
    ref = tmp_path / "ref"
    assert _cli([*args, "model.load=memory", f"hydra.run.dir={ref}"], tmp_path).returncode == 0
    run = tmp_path / "killed"
    cmd = [*args, "model.load=disk", f"hydra.run.dir={run}"]
    p = subprocess.run([sys.executable, "-c", KILLER, "block", str(4 * 7 + 10), *cmd], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == -9, p.stderr[-2000:]
    assert json.loads((run / "checkpoint" / "quant" / "state.json").read_text())["done"] == 0
    p = _cli(cmd, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data, save = _save_entry(run)
    quant = next(s for s in data["stages"] if s["name"] == "quant")
    assert quant["resumed_at_block"] == 1
    assert save["fingerprint"]["sha256"] == _save_entry(ref)[1]["fingerprint"]["sha256"]

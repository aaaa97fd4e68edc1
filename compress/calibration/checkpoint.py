"""Per-block checkpoints of one block walk, and resuming from them.

A walk that compresses blocks (pruning, quantization) writes, after every finished block, into its own
directory:

* ``block-00007.safetensors``: the block's whole state after it was compressed (every parameter and
  persistent buffer, so block transforms that touch norms are covered), plus what the method keeps for
  saving (``extra.*`` tensors, e.g. grid scales);
* ``inputs-00008.safetensors``: the hidden states that feed the next block (and the dense stream's, when
  one is carried) and the torch RNG state;
* ``state.json``: the last finished block, the report entries of every finished block, the block mode,
  and the walk's identity (the calibration tokens' sha256, the number of blocks).

Every file is written under a temporary name and renamed (``os.replace``), and ``state.json`` last: a
process killed at any moment leaves either the previous state or the new one, never a half-written
file that is read back. The inputs of the previous block are deleted only after the new state is in place.

Restoring the next block's inputs: they are stored, not recomputed. Recomputing them would cost a
forward of every calibration sample through all finished blocks (up to the whole model again); storing
costs one write of ``samples x seqlen x hidden`` values per block (timed in ``state.json`` as
``write_seconds``). A resumed walk recomputes at most the block that was being processed when the run
died.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from compress.core.errors import ConfigError

STATE = "state.json"


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def atomic_save_file(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.save_file`` under a temporary name, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Resume:
    """Where a walk continues: the next block to process, the finished blocks' states (as the walk's
    ``state_of`` returned them), the next block's inputs and the block mode."""

    next_block: int
    states: List[Dict]
    hidden: List[torch.Tensor]
    dense_hidden: Optional[List[torch.Tensor]]
    mode: Dict = field(default_factory=dict)


class BlockCheckpoints:
    """The checkpoint directory of one walk (see the module docstring)."""

    def __init__(self, path, identity: Dict):
        self.path = Path(path)
        self.identity = identity
        self.write_seconds = 0.0
        self._states: List[Dict] = []
        self._stored: List[bool] = []  # per finished block: whether it has a block file (not when kept elsewhere)
        self._mode: Dict = {}

    def _block_file(self, idx: int) -> Path:
        return self.path / f"block-{idx:05d}.safetensors"

    def _inputs_file(self, idx: int) -> Path:
        return self.path / f"inputs-{idx:05d}.safetensors"

    def resume(self) -> Optional[Resume]:
        """The state to continue from, or None for a fresh walk. A checkpoint of another walk (other
        calibration tokens, another number of blocks) is refused, naming what differs."""
        state_file = self.path / STATE
        if not state_file.exists():
            return None
        state = json.loads(state_file.read_text())
        old = state.get("identity", {})
        changed = [k for k in sorted(set(old) | set(self.identity)) if old.get(k) != self.identity.get(k)]
        if changed:
            what = "; ".join(f"{k}: {old.get(k)!r} -> {self.identity.get(k)!r}" for k in changed)
            raise ConfigError(f"cannot resume from {self.path}: the walk changed since the checkpoint ({what}). "
                              "Start in a new run directory, or delete the checkpoint to start again")
        nxt = int(state["done"]) + 1
        self._states, self._mode = list(state["states"]), dict(state.get("mode") or {})
        self._stored = list(state.get("stored") or [True] * len(self._states))
        self.write_seconds = float(state.get("write_seconds", 0.0))
        hidden, dense = [], None
        if nxt < int(self.identity["nblocks"]):
            saved = load_file(str(self._inputs_file(nxt)))
            n = int(saved["count"].item())
            hidden = [saved[f"hidden.{i}"] for i in range(n)]
            if "dense.0" in saved:
                dense = [saved[f"dense.{i}"] for i in range(n)]
            if "rng" in saved:
                torch.set_rng_state(saved["rng"])
        return Resume(nxt, self._states, hidden, dense, self._mode)

    def load_block(self, idx: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """A finished block's state dict and its extra tensors (none when the block was kept elsewhere, e.g. in
        the output shards of a model on disk)."""
        if not self._stored[idx]:
            return {}, {}
        saved = load_file(str(self._block_file(idx)))
        block = {k[6:]: v for k, v in saved.items() if k.startswith("block.")}
        extra = {k[6:]: v for k, v in saved.items() if k.startswith("extra.")}
        return block, extra

    def save(self, idx: int, block_state: Optional[Dict[str, torch.Tensor]], hidden: Optional[List[torch.Tensor]],
             dense_hidden: Optional[List[torch.Tensor]], state: Dict, extra: Optional[Dict[str, torch.Tensor]] = None,
             mode: Optional[Dict] = None) -> None:
        """Block ``idx`` finished: write its state and the next block's inputs, then the new state file.
        ``block_state`` None: the block's weights are kept elsewhere (e.g. already in the output shards)."""
        t0 = time.perf_counter()
        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {f"block.{k}": v.detach().cpu() for k, v in (block_state or {}).items()}
        tensors.update({f"extra.{k}": v.detach().cpu() for k, v in (extra or {}).items()})
        if tensors:
            atomic_save_file(tensors, self._block_file(idx))
        last = idx + 1 >= int(self.identity["nblocks"])
        if not last:
            inputs = {f"hidden.{i}": h.detach().cpu() for i, h in enumerate(hidden)}
            if dense_hidden is not None and dense_hidden is not hidden:
                inputs.update({f"dense.{i}": h.detach().cpu() for i, h in enumerate(dense_hidden)})
            inputs["count"] = torch.tensor(len(hidden))
            inputs["rng"] = torch.get_rng_state()
            atomic_save_file(inputs, self._inputs_file(idx + 1))
        self._states.append(state)
        self._stored.append(bool(tensors))
        if mode:
            self._mode = mode
        self.write_seconds += time.perf_counter() - t0
        atomic_write_text(self.path / STATE, json.dumps(
            {"done": idx, "identity": self.identity, "states": self._states, "stored": self._stored, "mode": self._mode,
             "write_seconds": round(self.write_seconds, 3)}, default=str))
        self._inputs_file(idx).unlink(missing_ok=True)


def walk_checkpoints(directory, calib_ids: Optional[torch.Tensor], nblocks: int, walk: str = "") -> Optional[BlockCheckpoints]:
    """The checkpoints of a walk over ``nblocks`` blocks on ``calib_ids`` in ``directory`` (None: none)."""
    if directory is None or calib_ids is None:
        return None
    return BlockCheckpoints(directory, {"walk": walk or Path(directory).name, "nblocks": int(nblocks),
                                        "calibration_shape": list(calib_ids.shape),
                                        "calibration_sha256": tensor_sha256(calib_ids)})

"""The stage contract: ``Stage.run(ctx) -> StageResult``.

A stage (prune, structured, train, quant) gets a :class:`StageContext` (the config, the model, the
tokenizer, the device, the run directory, and what earlier stages left in :class:`Facts`) and returns a
:class:`StageResult`: the model as it left it, what it did (a short summary for the stage's entry in
the record, its full report, metrics, protocol entries), what later stages may rely on, and how to save
the model (a :class:`Saver`). A stage never writes the run record: :mod:`compress.experiment` does, from
the result. A stage that compressed less than it was asked to raises
:class:`~compress.core.errors.ShortfallError` carrying its (partial) result, which is recorded before
the run fails.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Protocol, Tuple

from compress.calibration.blocks import find_blocks
from compress.calibration.onload import CheckpointReader, DiskBlocks, ShardWriter
from compress.core.distributed import barrier, rank


@dataclass(frozen=True)
class Facts:
    """What the stages so far left that later ones rely on (typed, not a free-form dict)."""

    nm: Optional[Tuple[int, int]] = None  # an N:M pattern every pruned linear keeps (checked after quantizing)
    pattern: Optional[str] = None  # the sparsity pattern a mask method left ("unstructured", "2:4")
    structured: bool = False  # heads / channels / blocks were removed for real (saved with probe logits)
    # "module:function" that reloads a checkpoint stock from_pretrained refuses by design (non-uniform widths)
    loader: Optional[str] = None
    flop_ratio_ceiling: Optional[float] = None  # dense / pruned analytic FLOPs (structured), for eval.speed
    quantized: bool = False  # the linears lie on a grid (no further stage may move them off it)


class Saver(Protocol):
    """How to write the model as a stage left it, so that stock ``from_pretrained`` reloads it."""

    format: str

    def save(self, model, tokenizer, out_dir: Path) -> Dict:
        """Write ``model`` into ``out_dir`` (safetensors only) and return what was written."""


@dataclass
class StageContext:
    cfg: Any  # compress.config.Config
    model: Any
    tokenizer: Any
    device: str
    out_dir: Path
    facts: Facts = field(default_factory=Facts)
    # where this stage's block walk checkpoints every finished block and resumes from (None: no checkpoints)
    checkpoint_dir: Optional[Path] = None
    # model.load=disk: the model is a skeleton on the meta device and its weights are in this checkpoint
    # directory; a stage streams the blocks from it and returns the directory it wrote (StageResult.weights)
    weights: Optional[Path] = None
    work_dir: Optional[Path] = None  # this stage's own directory in the run (its output shards when on disk)

    def dtype(self):
        import torch

        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def disk_store(self) -> Optional[DiskBlocks]:
        """For a model on disk: the block store that reads ``weights`` and writes this stage's output shards
        into ``work_dir/weights`` (None for a model in memory)."""
        if self.weights is None:
            return None
        blocks_name, _ = find_blocks(self.model)
        store = DiskBlocks(self.model, CheckpointReader(self.weights), blocks_name, self.dtype())
        store.writer = ShardWriter(Path(self.work_dir) / "weights", store.shards())
        return store

    def finish_disk(self, store: DiskBlocks) -> Path:
        """The stage's output checkpoint complete: the tensors outside the blocks, the index, the config."""
        if rank() == 0:
            store.write_outer()
            store.writer.finish(self.weights)
        barrier()  # the other ranks read it only once it is complete
        return store.writer.out_dir


@dataclass
class StageResult:
    model: Any
    summary: Dict = field(default_factory=dict)  # the stage's entry in results.json "stages"
    sections: Dict[str, Any] = field(default_factory=dict)  # top-level record sections (e.g. "prune_report")
    metrics: Dict = field(default_factory=dict)  # merged into results.json "metrics"
    protocol: Dict = field(default_factory=dict)  # merged into results.json "protocol"
    facts: Dict = field(default_factory=dict)  # fields of Facts this stage sets
    saver: Optional[Saver] = None  # None: the model is saved with the previous stage's saver
    printed: str = ""  # what the stage shows the user (its table)
    weights: Optional[Path] = None  # a model on disk: the checkpoint directory the stage wrote

    def apply(self, facts: Facts) -> Facts:
        return replace(facts, **self.facts) if self.facts else facts


class Stage(Protocol):
    name: str

    def run(self, ctx: StageContext) -> StageResult:
        ...


class PretrainedSaver:
    """``save_pretrained`` with safetensors (dense, pruned, structurally pruned, bitsandbytes models)."""

    format = "safetensors"

    def save(self, model, tokenizer, out_dir: Path) -> Dict:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        return {"format": self.format, "path": str(out_dir),
                "bytes": sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))}


class DiskSaver:
    """A model on disk: its checkpoint was written shard by shard by the last stage; saving links (or copies)
    those files into place. Stock ``from_pretrained`` reads the sharded safetensors checkpoint."""

    format = "safetensors (sharded, written block by block)"

    def __init__(self, weights: Path):
        self.weights = Path(weights)

    def save(self, model, tokenizer, out_dir: Path) -> Dict:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in self.weights.iterdir():
            if f.is_file():
                try:
                    os.link(f, out_dir / f.name)
                except OSError:
                    shutil.copyfile(f, out_dir / f.name)
        if not (out_dir / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(out_dir)
        return {"format": self.format, "path": str(out_dir),
                "bytes": sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))}

"""Models larger than host memory: built on the meta device, each block read from the checkpoint's safetensors
shards when its turn comes, compressed, written to the output checkpoint and freed.

* :func:`skeleton` builds the model from its config with every parameter on the meta device (buffers
  computed at construction, such as rotary frequencies, are real);
* :class:`CheckpointReader` reads named tensors from a checkpoint directory (single file or sharded with
  an index), opening each file only while it reads;
* :class:`ShardWriter` writes the output checkpoint one shard at a time (atomic renames) and its index;
* :class:`DiskBlocks` is the block store of :func:`compress.calibration.runner.run_sequential` for such a
  model: ``onload`` reads block ``i``, ``finished`` writes it to the output, ``release`` puts it back on
  the meta device. :meth:`DiskBlocks.outer` loads the modules outside the blocks that the walk needs (the
  embeddings, the final norm; not the head) for the capture of the blocks' inputs and frees them after.

Peak host memory is about one block plus the calibration activations and statistics, whatever the depth.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from safetensors import safe_open
from torch import nn

from compress.calibration.checkpoint import atomic_save_file, atomic_write_text
from compress.core.distributed import rank

INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Named tensors of a safetensors checkpoint directory (``model.safetensors`` or shards + index)."""

    def __init__(self, path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.exists():
            self.files: Dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        elif (self.path / "model.safetensors").exists():
            with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
                self.files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors nor {INDEX} (safetensors checkpoints only)")

    def names(self) -> List[str]:
        return list(self.files)

    def under(self, prefix: str) -> List[str]:
        return [n for n in self.files if n.startswith(prefix)]

    def read(self, names: Iterable[str], device="cpu", dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        by_file: Dict[str, List[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for fname, ns in by_file.items():
            with safe_open(str(self.path / fname), framework="pt", device=str(device)) as f:
                for n in ns:
                    t = f.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
        return out

    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.files.values()))


def skeleton(path, dtype: torch.dtype, trust_remote_code: bool = False, revision=None) -> nn.Module:
    """The model of the checkpoint at ``path`` with its parameters on the meta device (no weight read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    return model


def load_module(module: nn.Module, prefix: str, reader: CheckpointReader, device, dtype: torch.dtype,
                strict: bool = True) -> None:
    """Give ``module`` its tensors ``<prefix><name>`` from the checkpoint (on ``device``, in ``dtype``)."""
    names = reader.under(prefix)
    sd = {n[len(prefix):]: t for n, t in reader.read(names, device, dtype).items()}
    missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    if strict and (missing or unexpected):
        raise RuntimeError(f"{reader.path}: loading {prefix or 'the model'}: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}")


def release(module: nn.Module) -> None:
    """Free a module's parameters (and persistent buffers): back to the meta device."""
    module.to("meta")


class ShardWriter:
    """The output checkpoint, one shard at a time: ``model-0000k-of-0000n.safetensors``, then the index."""

    def __init__(self, out_dir, total: int):
        self.out_dir, self.total = Path(out_dir), int(total)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.total:05d}.safetensors"

    def write(self, k: int, tensors: Dict[str, torch.Tensor]) -> None:
        atomic_save_file({n: t.detach().cpu() for n, t in tensors.items()}, self.out_dir / self.shard_name(k),
                         metadata={"format": "pt"})

    def done(self, k: int) -> bool:
        return (self.out_dir / self.shard_name(k)).exists()

    def finish(self, source_dir) -> Path:
        """Write the index (read back from the shards' headers, so a resumed walk's earlier shards count) and
        copy the source checkpoint's other files (config, generation config, tokenizer)."""
        weight_map, total = {}, 0
        for k in range(self.total):
            f = self.out_dir / self.shard_name(k)
            if not f.exists():
                raise RuntimeError(f"{f} is missing: the walk did not write every shard")
            with safe_open(str(f), framework="pt") as sf:
                for n in sf.keys():
                    weight_map[n] = f.name
                    sl = sf.get_slice(n)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
        atomic_write_text(self.out_dir / INDEX, json.dumps({"metadata": {"total_size": total},
                                                            "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        for f in Path(source_dir).iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX:
                shutil.copyfile(f, self.out_dir / f.name)
        return self.out_dir


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dtype, 4)


class DiskBlocks:
    """The block store of a model on the meta device (see the module docstring). ``writer`` None: the walk
    only reads (evaluation, observation)."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, blocks_name: str, dtype: torch.dtype,
                 writer: Optional[ShardWriter] = None):
        self.model, self.reader, self.blocks_name, self.dtype, self.writer = model, reader, blocks_name, dtype, writer
        self.read_seconds = 0.0

    def prefix(self, idx: int) -> str:
        return f"{self.blocks_name}.{idx}."

    def onload(self, idx: int, block: nn.Module, device) -> None:
        load_module(block, self.prefix(idx), self.reader, device, self.dtype)

    def finished(self, idx: int, block: nn.Module) -> None:
        if self.writer is not None and rank() == 0:  # several ranks hold the same weights: rank 0 writes
            self.writer.write(idx, {self.prefix(idx) + k: v for k, v in block.state_dict().items()})
        return None  # the output shard is the block's checkpoint

    def release(self, idx: int, block: nn.Module) -> None:
        release(block)

    def restore(self, idx: int, block: nn.Module, state) -> None:
        """Nothing to restore: a finished block lives in its output shard."""

    def outer_names(self) -> List[str]:
        """Tensors outside the blocks."""
        return [n for n in self.reader.names() if not n.startswith(self.blocks_name + ".")]

    @contextlib.contextmanager
    def outer(self, device, head: bool = False):
        """The modules outside the blocks loaded from the checkpoint (the head only with ``head``), freed after."""
        names = [n for n in self.outer_names() if head or not _is_head(self.model, n)]
        tensors = self.reader.read(names, device, self.dtype)
        loaded = []
        for n, t in tensors.items():
            mod_name, attr = n.rsplit(".", 1)
            mod = self.model.get_submodule(mod_name)
            old = getattr(mod, attr)
            setattr(mod, attr, nn.Parameter(t, requires_grad=False) if isinstance(old, nn.Parameter) else t)
            loaded.append((mod, attr, old))
        if head and getattr(self.model.config, "tie_word_embeddings", False):
            out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
            if out is not None and not any(_is_head(self.model, n) for n in names):
                loaded.append((out, "weight", out.weight))
                out.weight = inp.weight
        del tensors
        try:
            yield
        finally:  # the meta tensors back in place (the same objects: tied weights stay tied)
            for mod, attr, old in reversed(loaded):
                setattr(mod, attr, old)

    def write_outer(self) -> None:
        """Copy the tensors outside the blocks into the output, one shard each (after the blocks)."""
        nblocks = len(self.model.get_submodule(self.blocks_name))
        for j, n in enumerate(sorted(self.outer_names())):
            if not self.writer.done(nblocks + j):
                self.writer.write(nblocks + j, self.reader.read([n]))

    def shards(self) -> int:
        return len(self.model.get_submodule(self.blocks_name)) + len(self.outer_names())


def _is_head(model: nn.Module, name: str) -> bool:
    out = model.get_output_embeddings()
    if out is None:
        return False
    for mod_name, mod in model.named_modules():
        if mod is out:
            return name.startswith(mod_name + ".")
    return False

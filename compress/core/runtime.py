"""Process-wide state a run must control: seeds, and torch's global numeric switches."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

CACHE_ENV = "COMPRESS_CACHE"


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextlib.contextmanager
def scoped_torch_flags():
    """Restore torch's process-global numeric switches on exit (TF32 for matmul and cuDNN, the float32
    matmul precision, cuDNN benchmark/deterministic, deterministic algorithms, the 2:4 kernel backend),
    so that a stage that changes one (e.g. the trainer turns TF32 on) cannot change the next one's numerics."""
    import torch

    b = torch.backends
    saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, torch.get_float32_matmul_precision(), b.cudnn.benchmark,
             b.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        from torch.sparse import SparseSemiStructuredTensor
        cutlass = SparseSemiStructuredTensor._FORCE_CUTLASS
    except (ImportError, AttributeError):
        SparseSemiStructuredTensor, cutlass = None, None
    try:
        yield
    finally:
        (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, precision, b.cudnn.benchmark, b.cudnn.deterministic,
         det, warn) = saved
        torch.set_float32_matmul_precision(precision)
        torch.use_deterministic_algorithms(det, warn_only=warn)
        if SparseSemiStructuredTensor is not None:
            SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass


def cache_dir() -> Path:
    """Where converted checkpoints live: $COMPRESS_CACHE, else $XDG_CACHE_HOME/compress, else ~/.cache/compress."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compress"

"""torch.distributed, as the calibration walks use it: who am I, sum a tensor over ranks, send one from its
owner to all. Every helper is a no-op in a single process, so the walks call them unconditionally.

Started by ``torchrun --nproc_per_node N -m compress ...`` or ``accelerate launch --multi_gpu
--num_processes N -m compress ...`` (which also starts N processes on a machine without a GPU; plain
``accelerate launch --cpu --num_processes N`` starts one): the environment holds ``RANK``, ``WORLD_SIZE`` and
``MASTER_ADDR``; :func:`init_from_env` joins the group with gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init_from_env(device: str) -> Optional[Dict]:
    """Join the process group the launcher described in the environment (None in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return {"world_size": dist.get_world_size(), "rank": dist.get_rank(), "backend": dist.get_backend(),
            "launcher": "accelerate" if any(k.startswith("ACCELERATE_") for k in os.environ) else
            ("torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env"),
            "threads_per_rank": torch.get_num_threads()}


def all_reduce_sum_(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` summed over ranks, in place."""
    if t is not None and active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t``'s elementwise maximum over ranks, in place."""
    if t is not None and active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sums(*values: float) -> List[float]:
    """Python numbers summed over ranks (float64), e.g. a search's error sum and its sample count."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64,
                     device=torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    if active():
        dist.broadcast(t, src=src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box: List[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (on every rank)."""
    if not active():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def shard(n: int) -> List[int]:
    """This rank's share of ``n`` items (every ``world_size``-th, starting at the rank)."""
    return list(range(rank(), n, world_size()))


def destroy() -> None:
    """Leave the process group (after the stages: rank 0 saves and evaluates alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

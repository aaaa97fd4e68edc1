"""Process and device memory: peak RSS on CPU, the CUDA allocator's peak on GPU, the C allocator's heap
peak (the CPU analogue of ``max_memory_allocated``), and free memory per device."""

from __future__ import annotations

import resource
from typing import Optional

MiB = 2**20


def proc_kb(path: str, key: str) -> Optional[int]:
    """The ``key: <n> kB`` value of a /proc file (``/proc/self/status``, ``/proc/meminfo``), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_peak_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), in MiB."""
    kb = proc_kb("/proc/self/status", "VmHWM")
    if kb is not None:
        return kb / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def free_memory_bytes(device) -> Optional[float]:
    """Free memory of ``device``: ``cudaMemGetInfo`` on CUDA, ``MemAvailable`` on the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    kb = proc_kb("/proc/meminfo", "MemAvailable")
    return kb * 1024.0 if kb is not None else None


class HeapPeak:
    """Peak bytes in use by the C allocator (glibc ``mallinfo2``: arena bytes in use + mmapped chunks),
    sampled from a thread every ``interval`` seconds: on CPU, the analogue of
    ``torch.cuda.max_memory_allocated``. Memory freed but kept by the allocator, which RSS counts, does
    not count here. glibc reports the main arena only: run with ``MALLOC_ARENA_MAX=1`` so that every
    thread allocates there. ``peak_mb`` is None where ``mallinfo2`` is missing (not glibc >= 2.33)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_mb: Optional[float] = None
        self._fn = None
        try:
            import ctypes

            class _MallInfo2(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                             "fsmblks", "uordblks", "fordblks", "keepcost")]

            fn = ctypes.CDLL("libc.so.6").mallinfo2
            fn.restype = _MallInfo2
            self._fn = fn
        except (OSError, AttributeError):
            pass

    def _in_use(self) -> int:
        m = self._fn()
        return m.uordblks + m.hblkhd

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._in_use())
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._fn is not None:
            import threading

            self._peak = self._in_use()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._fn is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._in_use()) / MiB
        return False


class PeakMemory:
    """Peak memory over a region: CUDA allocator peak on GPU, process RSS peak on CPU."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.peak_mb: Optional[float] = None
        self.kind = "cuda_max_memory_allocated" if self.device.startswith("cuda") else "process_peak_rss"

    def __enter__(self):
        if self.kind.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.reset_ok = reset_rss_peak()
        return self

    def __exit__(self, *exc):
        if self.kind.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / MiB
        else:
            self.peak_mb = rss_peak_mb()
        return False

"""The run record: ``results.json``, written atomically after every stage.

A stage that fails is recorded as failed (with its error) and everything measured before it stays on
disk. Peak memory per stage is the process's peak RSS on CPU (reset through ``/proc/self/clear_refs``
where Linux allows it) and ``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional


def atomic_write_json(path, data: Dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


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


def _rss_peak_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), in MiB."""
    kb = proc_kb("/proc/self/status", "VmHWM")
    if kb is not None:
        return kb / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
            self.peak_mb = max(self._peak, self._in_use()) / 2**20
        return False


class PeakMemory:
    """Measures peak memory over a region: CUDA allocator peak on GPU, process RSS peak on CPU."""

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
            self.reset_ok = _reset_rss_peak()
        return self

    def __exit__(self, *exc):
        if self.kind.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = _rss_peak_mb()
        return False


_PACKAGE_COMMIT: dict = {}  # the package checkout's commit, read once per process


def git_commit(cwd=None) -> Optional[str]:
    """The commit (``-dirty`` with uncommitted changes) of ``cwd``'s checkout, by default the package's.
    The package's is read once per process: a process runs the code it imported, so a commit made
    while a one-process sweep runs must not relabel its later cells."""
    if cwd is None and "commit" in _PACKAGE_COMMIT:
        return _PACKAGE_COMMIT["commit"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            result = None
        else:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=cwd or Path(__file__).parent, capture_output=True, text=True,
                                   timeout=5).stdout.strip()
            result = out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        result = None
    if cwd is None:
        _PACKAGE_COMMIT["commit"] = result
    return result


def code_version() -> str:
    """``<package version>+<git commit>`` (``-dirty`` with uncommitted changes), or the package version
    alone outside a git checkout: what a sweep compares before reusing a finished cell."""
    from compress import __version__

    commit = git_commit()
    return f"{__version__}+{commit[:12]}{'-dirty' if commit.endswith('-dirty') else ''}" if commit else __version__


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


def environment(device: str, seed: int) -> Dict[str, Any]:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "seed": seed,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    for pkg in ("accelerate", "peft", "bitsandbytes", "datasets", "hydra"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:  # optional at run time
            pass
    from compress import __version__

    env["compress"] = __version__
    return env


class RunRecord:
    """Holds ``results.json`` for one run and rewrites it atomically on every change."""

    def __init__(self, out_dir, config: Dict[str, Any], device: str = "cpu", seed: int = 0, **extra):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "results.json"
        self.device = str(device)
        self.data: Dict[str, Any] = {
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
            "config": config,
            "metrics": {},
            "stages": [],
            "protocol": {},
            "environment": environment(device, seed),
        }
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def set(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.save()

    def update_metrics(self, **metrics) -> None:
        self.data["metrics"].update(metrics)
        self.save()

    @contextlib.contextmanager
    def stage(self, name: str, method: str = ""):
        """Time a stage and record it; on failure record the error, save, and re-raise."""
        entry: Dict[str, Any] = {"name": name, "method": method, "status": "running"}
        info: Dict[str, Any] = {}
        t0 = time.perf_counter()
        mem = PeakMemory(self.device).__enter__()
        try:
            yield info
        except BaseException as e:
            entry.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        else:
            entry["status"] = "ok"
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            mem.__exit__(None, None, None)
            entry["peak_memory_mb"] = round(mem.peak_mb, 1)
            entry["peak_memory_kind"] = mem.kind
            entry.update(info)
            self.data["stages"].append(entry)
            if entry["status"] == "failed":
                self.data["status"] = "failed"
            self.save()

    def finish(self, status: str = "ok") -> None:
        if self.data["status"] != "failed":
            self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()

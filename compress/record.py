"""The run record: ``results.json``, written atomically after every stage, and what identifies the
machine and the code that produced it.

A stage that fails is recorded as failed (with its error) and everything measured before it stays on
disk. Peak memory per stage is the process's peak RSS on CPU (reset through ``/proc/self/clear_refs``
where Linux allows it) and ``torch.cuda.max_memory_allocated`` on GPU. Only :mod:`compress.experiment`
writes a run's record.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional

from compress import __version__
from compress.core.memory import PeakMemory, proc_kb


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
    commit = git_commit()
    return f"{__version__}+{commit[:12]}{'-dirty' if commit.endswith('-dirty') else ''}" if commit else __version__


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
    env["compress"] = __version__
    return env


def machine_info() -> Dict[str, Any]:
    """The machine in words, for benchmark records: CPU model and cores, memory, GPU, and the versions."""
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = proc_kb("/proc/meminfo", "MemTotal")
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(mem / 2**20, 1) if mem else None, "python": platform.python_version(),
            "torch": torch.__version__, "compress": __version__, "git_commit": git_commit()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class RunRecord:
    """Holds ``results.json`` for one run and rewrites it atomically on every change."""

    def __init__(self, out_dir, config: Dict[str, Any], device: str = "cpu", seed: int = 0, write: bool = True,
                 **extra):
        self.write = write  # several ranks: only rank 0 writes the record
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "results.json"
        self.device = str(device)
        self.data: Dict[str, Any] = {
            "status": "running",
            "started": datetime.now().astimezone().isoformat(timespec="microseconds"),
            **extra,
            "config": config,
            "metrics": {},
            "stages": [],
            "protocol": {},
            "environment": environment(device, seed),
        }
        self.save()

    def save(self) -> None:
        if self.write:
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
        self.data["finished"] = datetime.now().astimezone().isoformat(timespec="microseconds")
        self.save()

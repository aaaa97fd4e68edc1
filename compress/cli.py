"""The ``compress`` command: a Hydra app, plus the ``list`` and ``compare`` subcommands.

Start-up stays light (no torch import) so that a bad config fails within a second or two.
"""

from __future__ import annotations

import sys
from pathlib import Path

from compress.config import ConfigError, register_configs, validate


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
    lines.append("Config groups (compress GROUP=OPTION):")
    for group in sorted(p for p in config_dir().iterdir() if p.is_dir() and not p.name.startswith(("_", "hydra"))):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name:<10} {', '.join(options)}")
    launchers = sorted(f.stem for f in (config_dir() / "hydra" / "launcher").glob("*.yaml"))
    lines.append(f"  {'hydra/launcher':<10} basic (default), {', '.join(launchers)}   (sweeps: compress -m hydra/launcher=NAME ...)")
    lines.append("")
    lines.append("Subcommands: compress list | compress compare DIR [DIR ...]")
    lines.append("Any key can be overridden, e.g. compress recipe=wanda_50 prune.sparsity=0.6 eval.max_windows=10")
    return "\n".join(lines)


def _task(cfg) -> None:
    try:
        config = validate(cfg)
    except ConfigError as e:
        print(f"compress: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from compress.experiment import run_experiment

    hc = HydraConfig.get()
    recipe = hc.runtime.choices.get("recipe")
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run_experiment(config, out_dir=hc.runtime.output_dir, recipe=None if recipe == "none" else recipe,
                       resolved=cfg, sweep_dir=hc.sweep.dir if multirun else None)
    except Exception as e:  # in a sweep a failed cell is recorded (results.json) and the others go on
        from compress.errors import CompressError

        if multirun:
            print(f"compress: cell {hc.runtime.output_dir} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return
        if isinstance(e, ConfigError):  # found once the model's config was read (e.g. quant.group_size)
            print(f"compress: invalid config: {e}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, CompressError):  # a refusal or shortfall, said in words: no traceback
            print(f"compress: {type(e).__name__}: {e}\n(recorded in {hc.runtime.output_dir}/results.json)",
                  file=sys.stderr)
            sys.exit(1)
        raise


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "list":
        print(list_options())
        return
    if argv and argv[0] == "compare":
        from compress.compare import main as compare_main

        sys.exit(compare_main(argv[1:]))
    if argv and argv[0] in ("-h", "--help"):
        print(list_options())
        print("\nHydra options follow.\n")
    import hydra

    register_configs()
    register_recipes()
    sys.argv = [sys.argv[0]] + argv
    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_task)
    app()


if __name__ == "__main__":
    main()

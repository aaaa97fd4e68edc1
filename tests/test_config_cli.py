import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.config import Config, prune_config
from compress.core.config import parse_pattern
from compress.core.errors import ConfigError
from compress.registry import names
from compress.schema import CalibConfig, EvalConfig, TrainConfig, ZeroShotConfig


def _cli(*args, cwd):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    return p, time.time() - t0


def test_unknown_group_option_fails_fast_with_choices(tmp_path):
    p, dt = _cli("prune=does_not_exist", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert p.returncode != 0
    assert dt < 10
    err = p.stderr + p.stdout
    assert "prune" in err and "does_not_exist" in err
    for choice in ("magnitude", "wanda", "sparsegpt", "none"):
        assert choice in err
    assert not (tmp_path / "r" / "results.json").exists()  # failed before any model loaded


def test_bad_value_fails_fast_naming_key(tmp_path):
    p, dt = _cli("eval.seqlen=-3", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert p.returncode != 0
    assert dt < 10
    assert "eval.seqlen" in p.stderr
    assert not (tmp_path / "r" / "results.json").exists()


def test_unknown_key_and_bad_pattern_fail(tmp_path):
    p, _ = _cli("prune.nonsense=1", cwd=tmp_path)
    assert p.returncode != 0 and "nonsense" in (p.stderr + p.stdout)
    p, _ = _cli("prune=wanda", "prune.pattern=4:2", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert p.returncode != 0 and "prune.pattern" in p.stderr


def test_list_shows_recipes_and_groups(tmp_path):
    p, _ = _cli("list", cwd=tmp_path)
    assert p.returncode == 0
    assert "dense" in p.stdout and "prune" in p.stdout and "sparsegpt" in p.stdout


@pytest.mark.parametrize("pattern,expected", [("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 4 ", (1, 4))])
def test_parse_pattern(pattern, expected):
    assert parse_pattern(pattern) == expected


@pytest.mark.parametrize("bad", ["4:4", "0:4", "5:4", "2-4", "half"])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ConfigError, match="prune.pattern"):
        parse_pattern(bad)


@pytest.mark.parametrize("kwargs,key", [
    (dict(sparsity=1.0), "prune.sparsity"), (dict(sparsity=-0.1), "prune.sparsity"),
    (dict(method="obs"), "prune='obs' is not a registered prune method"), (dict(schedule="owl", pattern="2:4"), "prune.schedule"),
    (dict(schedule="list"), "prune.layer_sparsities"), (dict(targets=["("]), "regex"),
    (dict(lora_steps=5), "prune.lora_steps is not a key of prune=wanda"),
])
def test_prune_config_validation(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        prune_config(**dict(dict(method="wanda"), **kwargs))


@pytest.mark.parametrize("args,key,method", [
    (["prune=wanda", "prune.lora_steps=5"], "prune.lora_steps", "prune=wanda"),
    (["quant=rtn", "quant.act_order=true"], "quant.act_order", "quant=rtn"),
    (["recipe=wanda_50", "+prune.lora_steps=5"], "prune.lora_steps", "prune=wanda"),
    (["prune=structured", "prune.importance=activation", "prune.lora_steps=5"], "prune.lora_steps",
     "prune.importance=activation"),
])
def test_a_key_of_another_method_is_refused_before_load(tmp_path, args, key, method):
    """A key the chosen method does not have (or that belongs to another structured importance) exits 2 within
    10 s, naming the key and the method, and writes nothing."""
    p, dt = _cli(*args, f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert dt < 10
    assert key in p.stderr and method in p.stderr
    assert not (tmp_path / "r").exists()


def test_other_groups_validate():
    with pytest.raises(ConfigError, match="calib.nsamples"):
        CalibConfig(nsamples=0)
    with pytest.raises(ConfigError, match="eval.max_windows"):
        EvalConfig(max_windows=0)
    assert EvalConfig(max_windows=None).max_windows is None
    with pytest.raises(ConfigError, match=r"eval\.zero_shot\.limit"):
        ZeroShotConfig(limit=0)
    with pytest.raises(ConfigError, match=r"eval\.speed_batch_size"):
        EvalConfig(speed_batch_size=0)
    with pytest.raises(ConfigError, match=r"train\.chunked_loss"):
        TrainConfig(chunked_loss=-1)
    with pytest.raises(ConfigError, match=r"train\.chunked_loss needs train\.distill=false"):
        TrainConfig(chunked_loss=512, distill=True)
    Config()  # defaults are valid


def test_new_eval_keys_fail_fast_from_the_cli(tmp_path):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "compress", "eval.zero_shot.num_fewshot=-1"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 2 and "eval.zero_shot.num_fewshot=-1" in p.stderr
    assert time.time() - t0 < 30  # no model was loaded


def test_group_options_and_list_come_from_the_registry(tmp_path):
    """Every registered method is a Hydra option of its group and appears in ``compress list``; no YAML or
    hand-kept tuple lists them."""
    from compress.cli import compose

    assert not (Path(__file__).parent.parent / "configs" / "prune").exists()
    for group in ("prune", "quant"):
        for name in names(group):
            assert compose([f"{group}={name}"])[group]["method"] == name
    p, _ = _cli("list", cwd=tmp_path)
    for group in ("prune", "quant", "importance"):
        for name in names(group):
            assert f"    {name} " in p.stdout


def test_every_shipped_yaml_and_method_composes():
    """Each group option, registered method and recipe composes into a valid Config (catches typos in shipped
    YAML, and a recipe that sets a key its method does not have)."""
    from compress.cli import compose, config_dir, recipes_dir
    from compress.config import validate

    overrides = []
    for group in ("calib", "eval", "train"):
        overrides += [f"{group}={f.stem}" for f in (config_dir() / group).glob("*.yaml")]
    for group in ("prune", "quant"):
        overrides += [f"{group}={n}" for n in names(group)]
    recipes = [f"recipe={f.stem}" for f in recipes_dir().glob("*.yaml")]
    assert len(recipes) > 20
    for o in overrides + recipes:
        validate(compose([o]))


@pytest.mark.parametrize("launcher,target,key,value", [
    ("local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs", 2),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "gpus_per_node", 1),
])
def test_sweep_launcher_configs_load(launcher, target, key, value, monkeypatch):
    """The shipped launcher configs compose with their plugins and name importable launcher classes."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    from compress.cli import config_dir
    from compress.config import register_configs

    monkeypatch.delenv("COMPRESS_SLURM_PARTITION", raising=False)
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    lc = cfg.hydra.launcher
    assert lc._target_ == target
    assert get_class(lc._target_).__name__ == target.rsplit(".", 1)[1]
    assert lc[key] == value
    if launcher == "slurm":
        assert lc.partition == "gpu" and lc.timeout_min == 240

"""The package as users get it: the wheel holds every subpackage of compress/, the configs, the recipes and
the data (found by discovery, never a hand list), and an installed copy works from any directory."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=600, cwd=out)
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = out.glob("compress-*.whl")
    return whl


def test_wheel_holds_every_subpackage_config_recipe_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.parent.relative_to(ROOT) for p in (ROOT / "compress").rglob("__init__.py"))
    assert len(packages) >= 9
    missing = [str(p) for p in packages if f"{p.as_posix()}/__init__.py" not in names]
    assert not missing, f"subpackages missing from the wheel: {missing}"
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "compress").rglob("*.py")]
    assert not [m for m in modules if m not in names]
    for src, dst in (("configs", "compress/configs"), ("recipes", "compress/recipes")):
        files = [p.relative_to(ROOT / src).as_posix() for p in (ROOT / src).rglob("*.yaml")]
        assert files and not [f for f in files if f"{dst}/{f}" not in names], src
    data = [p.relative_to(ROOT).as_posix() for p in (ROOT / "compress" / "data").rglob("*") if p.is_file()
            and "__pycache__" not in p.parts]
    assert any(d.endswith("wiki.test.raw") for d in data)
    assert not [d for d in data if d not in names]


def test_installed_copy_works_outside_the_source_tree(wheel, tmp_path):
    """A venv that sees the test environment's packages, with the wheel installed (not editable): from a
    directory outside the checkout, every module imports from the installed copy and ``compress list`` runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import compress, importlib, pkgutil; print(compress.__file__); "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(compress.__path__, 'compress.') "
            "if not m.name.endswith('__main__')]; "
            "import compress.stages.structured, compress.cli; print(compress.cli.config_dir())")
    p = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    where, configs = p.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(venv)) and configs.startswith(str(venv)), p.stdout
    p = subprocess.run([str(py), "-m", "compress", "list"], capture_output=True, text=True, timeout=300, cwd=work)
    assert p.returncode == 0 and "structured" in p.stdout and "sparsegpt_gptq" in p.stdout, p.stderr[-2000:]

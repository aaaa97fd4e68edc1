"""Package discovery for setuptools (the metadata is in pyproject.toml).

Every package under ``compress/`` is found, never listed by hand; ``configs/`` and ``recipes/`` (top-level
in the repository) ship inside the package as ``compress.configs`` and ``compress.recipes``.
``tests/test_packaging.py`` builds the wheel and checks that it holds every subpackage, config, recipe and
data file.
"""

from setuptools import find_packages, setup

RESOURCES = {"compress.configs": "configs", "compress.recipes": "recipes"}

setup(packages=find_packages(include=["compress", "compress.*"]) + list(RESOURCES), package_dir=RESOURCES)

"""Block transforms applied inside the quant stage before its quantizer (``transform=<name>``): one module
each, registered with :mod:`compress.registry` (kind ``transform``). They act on the coupled modules of a
block (:func:`compress.calibration.roles.coupled_groups`), never on a family by name.

The contract: ``Transform(cfg, spec)`` with the transform's own config and the quantizer's grid;
``prepare(model)`` once; then, in the quant stage's block loop, ``transform_block(index, block, inputs,
linears) -> dict`` for each block before its statistics are collected (the dict goes into the report).
A transform must leave the float model's function unchanged (it rescales, the quantizer quantizes).

Every module of this package is imported here, so that a new transform is one new file.
"""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

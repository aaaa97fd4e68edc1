"""Block transforms applied inside the quant stage before its quantizer (``transform=<name>``): one module
each, registered with :mod:`compress.registry` (kind ``transform``). They act on the coupled modules of a
block (:func:`compress.calibration.roles.coupled_groups`), never on a family by name.

The contract: ``Transform(cfg, spec, act=None)`` with the transform's own config, the quantizer's grid and
its 8-bit activation format (:class:`compress.core.grid.ActSpec`, None when weight-only); ``prepare(model)
-> dict`` once, on the model in memory (a rotation transforms the whole model there; what it returns goes
into the report); then, in the quant stage's block loop, ``transform_block(index, block, inputs, linears)
-> dict`` for each block before its statistics are collected (the dict goes into the report).
``needs_calibration`` (default True): False when the transform uses no calibration data. A transform must
leave the float model's function unchanged (it rescales or rotates, the quantizer quantizes).

Every module of this package is imported here, so that a new transform is one new file.
"""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

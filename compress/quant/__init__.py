"""Quantizers (RTN, GPTQ, the joint SparseGPT + GPTQ, bitsandbytes): one module each, registered with
:mod:`compress.registry`, plus :mod:`~compress.quant.export` (the compressed-tensors format).

Every module of this package is imported here, so that a new quantizer is one new file.
"""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

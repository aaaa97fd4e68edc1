"""Mask methods (unstructured and N:M): one module each, registered with :mod:`compress.registry`.

Every module of this package is imported here, so that a new method is one new file
(``compress/pruning/<name>.py``): its config, the statistics it needs, and its step.
"""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

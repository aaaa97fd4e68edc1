"""Structured pruning: remove whole attention heads (GQA-aware), MLP channels or decoder blocks for real.

* :mod:`~compress.structured.config`: ``prune=structured`` (run by :mod:`compress.stages.structured`);
* one module per importance, registered as kind ``importance``: :mod:`~compress.structured.magnitude`,
  :mod:`~compress.structured.activation`, :mod:`~compress.structured.taylor`,
  :mod:`~compress.structured.block` (depth), :mod:`~compress.structured.lora` (LoRAPrune);
* :mod:`~compress.structured.scoring`: what importances share (group scores, the context);
* :mod:`~compress.structured.surgery`: planning, masking, physical removal, parameter counts.

The roles of a block's modules come from :mod:`compress.calibration.roles`. Every module of this
package is imported here, so that a new importance is one new file.
"""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

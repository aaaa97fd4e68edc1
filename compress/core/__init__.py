"""Pure primitives every other layer builds on; this package imports nothing else from compress.

* :mod:`~compress.core.errors` errors said in words; :mod:`~compress.core.config` config value checks;
* :mod:`~compress.core.masks` masks from scores (unstructured, N:M) and the N:M check;
* :mod:`~compress.core.grid` integer grids (fit, quantize, dequantize, RTN);
* :mod:`~compress.core.linalg` the damped inverse Cholesky factor;
* :mod:`~compress.core.modules` linear-like modules, weight views, unique parameters, hooks;
* :mod:`~compress.core.counting` FLOPs from shapes; :mod:`~compress.core.memory` process and device memory;
* :mod:`~compress.core.runtime` seeds and torch's process-global switches.
"""

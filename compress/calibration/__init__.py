"""The method-agnostic calibration layer shared by pruning, quantization and structured importance.

* :mod:`~compress.calibration.blocks`: find the decoder blocks, capture every block's own arguments, replay them;
* :mod:`~compress.calibration.targets`: the one resolver of which modules a stage compresses;
* :mod:`~compress.calibration.runner`: the block-by-block pipeline;
* :mod:`~compress.calibration.stats`: input statistics (Hessians, norms, moments) and their collector;
* :mod:`~compress.calibration.loop`: the block loop (single pass, two passes, auto) and the method contract;
* :mod:`~compress.calibration.obs`: the ordered-column OBS loop (SparseGPT, GPTQ, the joint method);
* :mod:`~compress.calibration.memory`: the memory estimate behind the block-mode decision;
* :mod:`~compress.calibration.roles`: module roles and coupled modules of a block.

It imports only :mod:`compress.core`.
"""

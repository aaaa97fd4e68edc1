"""The method-agnostic calibration layer shared by pruning, quantization and structured importance.

* :mod:`compress.calibration.blocks`: find the decoder blocks, capture every block's own arguments,
  replay them;
* :mod:`compress.calibration.targets`: the one resolver of which modules a stage compresses, and the
  ``[out, in]`` view of linear-like weights (``nn.Linear``, ``transformers.Conv1D``);
* :mod:`compress.calibration.runner`: the block-by-block pipeline.
"""

from compress.calibration.blocks import (BlockInputs, CapturedInputs, block_outputs, capture_block_inputs,
                                         find_blocks)
from compress.calibration.runner import BlockFn, BlockResult, run_sequential
from compress.calibration.targets import (LINEAR_TYPES, Targets, block_targets, in_features, is_linear,
                                          resolve_targets, weight_matrix)

__all__ = ["BlockInputs", "CapturedInputs", "block_outputs", "capture_block_inputs", "find_blocks", "BlockFn",
           "BlockResult", "run_sequential", "LINEAR_TYPES", "Targets", "block_targets", "in_features", "is_linear",
           "resolve_targets", "weight_matrix"]

"""SparseGPT + GPTQ in one column loop: each column's mask and grid chosen together (the joint one-pass
form of sparsity + quantization)."""

from __future__ import annotations

from dataclasses import dataclass

from compress.calibration.loop import LinearResult
from compress.calibration.sparsity import CalibratedMaskConfig
from compress.core.errors import ConfigError
from compress.core.linalg import corrected_target
from compress.quant.base import GridMethod
from compress.quant.gptq import GPTQConfig, gptq_quantize
from compress.registry import register


@dataclass
class SparseGPTGPTQConfig(GPTQConfig, CalibratedMaskConfig):
    """GPTQ's keys and a mask method's (sparsity, pattern, schedule, targets, propagate, dense_stats), as
    quant.* keys."""

    method: str = "sparsegpt_gptq"
    # SparseGPT's: reconstruct the dense model's layer outputs (min ||W X_dense - W' X_compressed||)
    error_correction: bool = False

    def validate(self) -> None:
        super().validate()
        if self.reconstruct_epochs:
            raise ConfigError(f"{self.key('reconstruct_epochs')} > 0: block reconstruction after the joint column "
                              "loop would move the quantized weights off their grid. Use the two-pass form "
                              "(prune=sparsegpt quant=gptq) or leave it at 0")
        if self.error_correction and self.sequential == "false":
            raise ConfigError(f"{self.key('error_correction')}=true needs {self.key('sequential')}=true or auto")
        nm = self.nm
        if nm is not None and self.group_size > 0 and self.group_size % nm[1]:
            raise ConfigError(f"{self.key('pattern')}={self.pattern} needs {self.key('group_size')} to be a "
                              f"multiple of {nm[1]}, got {self.group_size}")

    def label(self) -> str:
        return super().label().replace("sparsegpt_gptq", "gptq", 1) + " joint"


@register("quant", "sparsegpt_gptq", SparseGPTGPTQConfig)
class SparseGPTGPTQ(GridMethod):
    """SparseGPT's mask and GPTQ's grid chosen in one column loop (sparsity + quantization in one pass)"""

    needs_hessian = True
    preserves_zeros = False  # it chooses the zeros itself

    @staticmethod
    def work_floats(out_features: int, in_features: int) -> float:
        return 1.5 * out_features * in_features  # SparseGPT's working set (the memory estimate of the loop)

    def step(self, weight, stats, job) -> LinearResult:
        c = self.cfg
        if stats.G is not None:  # error_correction: the dense model's outputs as the target
            weight = corrected_target(weight, stats.H, stats.G, c.percdamp, c.damp_mode)
        factor = None if c.act_order else stats.damped_factor(c.percdamp, c.damp_mode)
        return gptq_quantize(weight, stats.H, self.spec, c.blocksize, c.percdamp, c.damp_mode, c.act_order,
                             sparsity=job.sparsity, nm=job.nm, factor=factor)

"""SparseGPT + GPTQ in one column loop: each column's mask and grid chosen together (the joint one-pass
form of sparsity + quantization)."""

from __future__ import annotations

from dataclasses import dataclass

from compress.calibration.loop import LinearResult
from compress.core.config import fraction, parse_pattern
from compress.core.errors import ConfigError
from compress.quant.base import GridMethod
from compress.quant.gptq import GPTQConfig, gptq_quantize
from compress.registry import register


@dataclass
class SparseGPTGPTQConfig(GPTQConfig):
    method: str = "sparsegpt_gptq"
    sparsity: float = 0.5  # fraction of weights removed (ignored for N:M)
    pattern: str = "unstructured"  # unstructured | N:M
    # statistics on each linear's inputs in the dense model as well as the compressed one (the dense
    # stream, same calibration windows; needs the single pass), as prune.dense_stats
    dense_stats: bool = False

    def needs_single_pass(self) -> str:
        return self.key("dense_stats") if self.dense_stats else ""

    @property
    def nm(self):
        return parse_pattern(self.pattern, self.key("pattern"))

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity)

    def validate(self) -> None:
        super().validate()
        fraction(self.key("sparsity"), self.sparsity)
        if self.dense_stats and self.sequential == "false":
            raise ConfigError(f"{self.key('dense_stats')}=true needs {self.key('sequential')}=true or auto")
        nm = self.nm
        if nm is not None and self.group_size != -1 and self.group_size % nm[1]:
            raise ConfigError(f"{self.key('pattern')}={self.pattern} needs {self.key('group_size')} to be a "
                              f"multiple of {nm[1]}, got {self.group_size}")

    def label(self) -> str:
        return super().label().replace("sparsegpt_gptq", "gptq", 1) + " joint"


@register("quant", "sparsegpt_gptq", SparseGPTGPTQConfig)
class SparseGPTGPTQ(GridMethod):
    """SparseGPT's mask and GPTQ's grid chosen in one column loop (sparsity + quantization in one pass)"""

    needs_hessian = True
    preserves_zeros = False  # it chooses the zeros itself

    def step(self, weight, stats, job) -> LinearResult:
        c = self.cfg
        factor = None if c.act_order else stats.damped_factor(c.percdamp, c.damp_mode)
        return gptq_quantize(weight, stats.H, self.spec, c.blocksize, c.percdamp, c.damp_mode, c.act_order,
                             sparsity=job.sparsity, nm=job.nm, factor=factor)

"""``prune=structured``: the config of structured pruning (run by its own stage, :mod:`compress.stages.structured`).

The shared fields (how much, which units, widths) are declared here. The importance estimators register
themselves (``prune.importance``, :mod:`compress.registry` kind ``importance``) and each names the keys
that only it uses (``owns``): such a key set with another importance is refused, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from compress.core.config import choice, non_negative, positive
from compress.core.errors import ConfigError
from compress.registry import MethodConfig, get, names, register, specs

LORA_SCORES = ("element_sq", "element_abs", "group_sq")


@dataclass
class StructuredConfig(MethodConfig):
    """Remove whole attention heads (GQA-aware), MLP channels or decoder blocks for real (LoRAPrune, FLAP-style
    activation, Taylor, magnitude, depth)."""

    method: str = "structured"
    importance: str = "activation"  # see `compress list`: lora | magnitude | activation | taylor | block (depth)
    ratio: float = 0.2  # fraction of the decoder-block parameters removed
    attn_unit: str = "kv_group"  # kv_group (a KV head and its query heads) | query_head (same count per group) | none
    # fraction of the attention units (KV groups / query heads per group) removed in every block; null = the
    # achievable fraction nearest to ratio. Default 0: MLP channels only, since on SmolLM2 (3 KV groups) one
    # KV group costs far more quality than the same parameters in MLP channels (BENCHMARKS.md)
    attn_fraction: Optional[float] = 0.0
    round_to: int = 8  # kept MLP channels are a multiple of this (e.g. 64 for GPU kernels)
    # uniform widths (every block loses the same; stock from_pretrained reloads it) or not: one global ranking
    # of the MLP channels across blocks, saved with per-layer widths that compress.structured.load_pruned reloads
    uniform: bool = True
    protect_first: int = 0  # never prune the first / last k blocks (depth; width with uniform=false)
    protect_last: int = 0
    # importance=activation: fluctuation (FLAP) | wanda
    activation_metric: str = "fluctuation"
    # importance=activation: add what the removed inputs of o / down gave on average (W[:, removed] @ mean x)
    # to their biases (FLAP's baseline; families without those biases get them, and their config switch)
    bias_compensation: bool = False
    # importance=lora (LoRAPrune): LoRA fine-tuning with the train group's LoRA settings, this many steps,
    # groups masked on a cubic ramp between the warm-up and the cool-down (fractions of the steps)
    lora_steps: int = 40
    lora_warmup: float = 0.2
    lora_cooldown: float = 0.2
    lora_ema: float = 0.9  # moving average of the scores over steps
    lora_every: int = 1  # prune every k steps on the ramp
    lora_base: str = "fp"  # fp (the model's dtype) | 8bit | 4bit (bitsandbytes QLoRA base)
    # how a step's weight scores become group scores: element_sq = sum over the group of ((W+sBA)⊙Ĝ)²
    # (Fisher-like, the default), element_abs = sum of |(W+sBA)⊙Ĝ| (LLM-Pruner's element-wise first order),
    # group_sq = (sum over the group of (W+sBA)⊙Ĝ)² per module (the group's own first-order loss change, squared)
    lora_score: str = "element_sq"
    # the estimator's LoRA rank (null = train.lora_r); train.lora_alpha is scaled with it (same alpha / r)
    lora_r: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        choice(self.key("importance"), self.importance, names("importance"))
        choice(self.key("attn_unit"), self.attn_unit, ("kv_group", "query_head", "none"))
        choice(self.key("activation_metric"), self.activation_metric, ("fluctuation", "wanda"))
        choice(self.key("lora_base"), self.lora_base, ("fp", "8bit", "4bit"))
        choice(self.key("lora_score"), self.lora_score, LORA_SCORES)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < float(self.ratio) < 0.95:
            raise ConfigError(f"{self.key('ratio')}={self.ratio!r} is not valid: it must be in (0, 0.95) (a fraction of "
                              "the decoder-block parameters)")
        if self.attn_fraction is not None and not 0.0 <= float(self.attn_fraction) < 1.0:
            raise ConfigError(f"{self.key('attn_fraction')}={self.attn_fraction!r} is not valid: it must be in [0, 1) "
                              "or null")
        positive(self.key("round_to"), self.round_to)
        positive(self.key("lora_steps"), self.lora_steps)
        positive(self.key("lora_every"), self.lora_every)
        if self.lora_r is not None:
            positive(self.key("lora_r"), self.lora_r)
        for k in ("protect_first", "protect_last"):
            non_negative(self.key(k), getattr(self, k))
        unit = get("importance", self.importance).impl.unit
        if (self.protect_first or self.protect_last) and unit == "width" and self.uniform:
            raise ConfigError(f"{self.key('protect_first')}/{self.key('protect_last')} with width pruning need "
                              f"{self.key('uniform')}=false: uniform widths cut every block alike (so that stock "
                              "from_pretrained reloads the model), and protected blocks make them non-uniform")
        if not self.uniform and not get("importance", self.importance).impl.global_ranking:
            raise ConfigError(f"{self.key('uniform')}=false ranks MLP channels across blocks once; it needs "
                              f"{self.key('importance')}=" + "|".join(s.name for s in specs("importance")
                                                                      if s.impl.global_ranking)
                              + f", got {self.importance}")
        if not (0 <= self.lora_warmup < 1 and 0 <= self.lora_cooldown < 1 and self.lora_warmup + self.lora_cooldown < 1):
            raise ConfigError(f"{self.key('lora_warmup')}={self.lora_warmup} / {self.key('lora_cooldown')}="
                              f"{self.lora_cooldown}: each in [0, 1) and together below 1 (the ramp lies between them)")
        if not 0 <= self.lora_ema < 1:
            raise ConfigError(f"{self.key('lora_ema')}={self.lora_ema!r} is not valid: it must be in [0, 1)")
        self.check_owned(self.changed())

    def check_owned(self, explicit) -> None:
        """A key that belongs to another importance (``owns``), given explicitly or away from its default,
        is refused, naming the key and the importance it belongs to."""
        for spec in specs("importance"):
            if spec.name == self.importance:
                continue
            for key in spec.owns:
                if key in explicit:
                    raise ConfigError(f"{self.key(key)} applies to {self.key('importance')}={spec.name} only, not to "
                                      f"{self.key('importance')}={self.importance}")

    def label(self) -> str:
        return f"structured {self.importance} {format(float(self.ratio), 'g')}"


register("prune", "structured", StructuredConfig, stage="structured")(StructuredConfig)

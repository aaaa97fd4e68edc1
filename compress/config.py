"""Typed experiment configuration.

Every config group (``model``, ``calib``, ``eval``, ``prune``, ``train``, ``quant``) has a dataclass
schema. Hydra composes the YAML files in ``configs/`` and ``recipes/`` on top of these schemas, so an
unknown key fails at composition time; :func:`validate` then builds the dataclasses, whose
``__post_init__`` checks every value. All of this happens before torch is imported or a model loads.

This module must stay import-light (no torch): the CLI imports it to fail fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

# Names the stages accept. Kept here (not imported from the registries) so that validation never
# imports torch; tests check these lists against the registries.
PRUNE_METHODS = ("none", "magnitude", "wanda", "sparsegpt", "structured")
IMPORTANCES = ("lora", "magnitude", "activation", "taylor", "block")
LORA_SCORES = ("element_sq", "element_abs", "group_sq")
TRAIN_METHODS = ("none", "full", "lora", "qlora")
QUANT_METHODS = ("none", "bnb", "rtn", "gptq")
STAGE_NAMES = ("prune", "train", "quant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("uniform", "list", "owl")
EMBEDDED_MODEL = "smollm2-135m"


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and the valid choices."""


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid. Valid choices: {', '.join(map(str, choices))}")


def _positive(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} is not valid: it must be a positive integer")


def dataset_key(source: str) -> str:
    """The metric key of an eval dataset: a named source as is (``wikitext2``), a local file by its stem
    (``metrics.ppl.my_corpus`` for ``/data/my_corpus.txt``)."""
    if "/" in source or "\\" in source or "." in source:
        import os

        return os.path.splitext(os.path.basename(source))[0] or source
    return source


def parse_pattern(pattern: str) -> Optional[tuple]:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4) meaning 2 weights kept in every 4."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ConfigError(
            f"prune.pattern={pattern!r} is not valid. Valid choices: 'unstructured' or 'N:M' with 0 < N < M (e.g. 2:4, 4:8)"
        )
    n, m_ = int(m.group(1)), int(m.group(2))
    if not 0 < n < m_:
        raise ConfigError(f"prune.pattern={pattern!r} is not valid: N:M needs 0 < N < M (N weights kept in every M)")
    return n, m_


@dataclass
class ModelConfig:
    name: str = EMBEDDED_MODEL  # the embedded default, a Hugging Face id, or a local directory
    dtype: str = "float32"
    device: str = "auto"  # auto = cuda if available, else cpu
    trust_remote_code: bool = False
    revision: Optional[str] = None
    attn_implementation: Optional[str] = None

    def __post_init__(self):
        _choice("model.dtype", self.dtype, DTYPES)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"model.device={self.device!r} is not valid. Valid choices: auto, cpu, cuda, cuda:N, mps")
        if not self.name:
            raise ConfigError("model.name is empty")


@dataclass
class CalibConfig:
    # wikitext2 (embedded validation text), wikitext2_hub, c4 (online), or a path to .txt/.jsonl/.parquet
    source: str = "wikitext2"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    text_field: str = "text"  # column for JSONL / Parquet sources
    batch_size: int = 1  # samples per forward call in the calibration pipeline

    def __post_init__(self):
        _positive("calib.nsamples", self.nsamples)
        _positive("calib.seqlen", self.seqlen)
        _positive("calib.batch_size", self.batch_size)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"calib.seed={self.seed!r} is not valid: it must be a non-negative integer")


@dataclass
class ZeroShotConfig:
    """lm-evaluation-harness tasks (optional dependency ``lm-eval``); empty = off."""
    tasks: List[str] = field(default_factory=list)  # e.g. [hellaswag, arc_easy] (online) or [compress_tiny_mc] (offline)
    num_fewshot: int = 0
    limit: Optional[int] = None  # samples per task (null = all)
    batch_size: int = 1
    include_path: Optional[str] = None  # a directory of your own task YAMLs

    def __post_init__(self):
        if not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise ConfigError(f"eval.zero_shot.num_fewshot={self.num_fewshot!r} is not valid: it must be >= 0")
        _positive("eval.zero_shot.limit", self.limit, allow_none=True)
        _positive("eval.zero_shot.batch_size", self.batch_size)
        for t in self.tasks:
            if not isinstance(t, str) or not t.strip():
                raise ConfigError(f"eval.zero_shot.tasks has {t!r}: each task is a non-empty lm-eval task name")


@dataclass
class EvalConfig:
    datasets: List[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 512
    max_windows: Optional[int] = 40  # null = all windows
    batch_size: int = 1
    add_bos: bool = False
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    # measured prefill throughput (tokens/s) of the final model on its device; on a CUDA GPU with
    # 2:4 weights also with the 2:4 sparse kernels (inference only, done last)
    speed: bool = False
    speed_batch_size: int = 8
    speed_seqlen: int = 512

    def __post_init__(self):
        _positive("eval.seqlen", self.seqlen)
        _positive("eval.max_windows", self.max_windows, allow_none=True)
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.speed_batch_size", self.speed_batch_size)
        _positive("eval.speed_seqlen", self.speed_seqlen)
        if not self.datasets:
            raise ConfigError("eval.datasets is empty: name at least one dataset (e.g. wikitext2)")
        keys = [dataset_key(d) for d in self.datasets]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ConfigError(f"eval.datasets={list(self.datasets)}: two datasets share the metric key {dup} (a local "
                              "file's key is its file name without extension); rename one")


@dataclass
class PruneConfig:
    method: str = "none"
    sparsity: float = 0.5  # fraction of weights removed (ignored for N:M, which fixes it at 1 - N/M)
    pattern: str = "unstructured"  # unstructured | N:M
    schedule: str = "uniform"  # uniform | list | owl
    layer_sparsities: Optional[List[float]] = None  # schedule=list: one value per decoder block
    owl_m: float = 5.0  # OWL outlier threshold (multiples of the mean score)
    owl_lambda: float = 0.08  # OWL: max deviation from the target sparsity
    scope: str = "layer"  # magnitude: layer (per module) | global
    targets: List[str] = field(default_factory=lambda: [r".*"])  # regex on module names inside blocks
    ignore: List[str] = field(default_factory=list)
    propagate: str = "pruned"  # pruned (reference) | dense: which outputs feed the next block
    # true: single pass (linears pruned in forward order on already-pruned inputs; every calibration sample
    # waits inside the block); false: the reference two-pass mode (one sample's activations at a time);
    # auto: the single pass when its estimated peak memory fits memory_budget x the free memory of the
    # device holding the activations, else two passes (options that need the single pass force it)
    sequential: str = "auto"
    memory_budget: float = 0.5  # sequential=auto: fraction of the free device memory the single pass may use
    offload: bool = False  # keep blocks on CPU and onload one at a time
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT relative dampening
    damp_mode: str = "mean"  # mean (reference: percdamp * mean diag H) | median (robust to massive activations)
    # SparseGPT only: reconstruct the *dense* model's layer outputs from the pruned model's inputs,
    # min ||W X_dense - W' X_pruned||, instead of the layer's own outputs (needs sequential=true)
    error_correction: bool = False
    # after pruning a block, refit its kept weights (masks fixed) so that the block reproduces the dense
    # model's block outputs on the calibration samples: Adam, this many epochs over the samples (0 = off).
    reconstruct_epochs: int = 0
    reconstruct_lr: float = 1e-4
    # also accumulate each linear's statistics on its inputs in the *dense* model (the dense stream,
    # same calibration windows): H = X_dense^T X_dense + X_pruned^T X_pruned (needs sequential=true)
    dense_stats: bool = False
    # ---- method=structured: remove whole heads, MLP channels or blocks (compress/structured/)
    importance: str = "activation"  # lora | magnitude | activation | taylor | block (block = depth pruning)
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
    activation_metric: str = "fluctuation"  # activation importance: fluctuation (FLAP) | wanda
    # activation importance: add what the removed inputs of o / down gave on average (W[:, removed] @ mean x)
    # to their biases (FLAP's baseline; families without those biases get them, and their config switch)
    bias_compensation: bool = False
    # lora importance (LoRAPrune): LoRA fine-tuning with the train group's LoRA settings, this many steps,
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

    def __post_init__(self):
        _choice("prune.method", self.method, PRUNE_METHODS)
        if self.method == "structured":
            self._check_structured()
        nm = parse_pattern(self.pattern)
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"prune.sparsity={self.sparsity!r} is not valid: it must be in [0, 1)")
        _choice("prune.schedule", self.schedule, SCHEDULES)
        _choice("prune.scope", self.scope, ("layer", "global"))
        _choice("prune.propagate", self.propagate, ("pruned", "dense"))
        seq = self.sequential
        self.sequential = ("true" if seq else "false") if isinstance(seq, bool) else str(seq).lower()
        _choice("prune.sequential", self.sequential, ("auto", "true", "false"))
        if not isinstance(self.memory_budget, (int, float)) or not 0 < float(self.memory_budget) <= 1:
            raise ConfigError(f"prune.memory_budget={self.memory_budget!r} is not valid: it must be in (0, 1] "
                              "(a fraction of the free memory)")
        if self.propagate == "dense" and self.sequential == "true":
            raise ConfigError("prune.propagate=dense needs prune.sequential=false or auto (the single pass propagates "
                              "pruned outputs)")
        _choice("prune.damp_mode", self.damp_mode, ("mean", "median"))
        if nm is not None and self.schedule != "uniform":
            raise ConfigError(f"prune.schedule={self.schedule!r} needs prune.pattern=unstructured (N:M fixes each layer's sparsity)")
        if nm is not None and self.scope == "global":
            raise ConfigError("prune.scope='global' needs prune.pattern=unstructured")
        if self.schedule == "list":
            if not self.layer_sparsities:
                raise ConfigError("prune.schedule='list' needs prune.layer_sparsities (one value per decoder block)")
            for s in self.layer_sparsities:
                if not 0.0 <= float(s) < 1.0:
                    raise ConfigError(f"prune.layer_sparsities has {s!r}: each must be in [0, 1)")
        if not 0 <= self.owl_lambda < 1:
            raise ConfigError(f"prune.owl_lambda={self.owl_lambda!r} is not valid: it must be in [0, 1)")
        two_pass = self.sequential == "false"
        if self.error_correction and (self.method != "sparsegpt" or two_pass):
            raise ConfigError("prune.error_correction=true needs prune.method=sparsegpt and prune.sequential=true or auto")
        if self.reconstruct_epochs and (self.method == "magnitude" or two_pass):
            raise ConfigError("prune.reconstruct_epochs > 0 needs a calibration method (wanda, sparsegpt) and "
                              "prune.sequential=true or auto")
        if self.dense_stats and (self.method == "magnitude" or two_pass or self.error_correction):
            raise ConfigError("prune.dense_stats=true needs a calibration method (wanda, sparsegpt), "
                              "prune.sequential=true or auto and prune.error_correction=false")
        if self.needs_single_pass() and self.propagate == "dense":
            raise ConfigError("prune.propagate=dense cannot be combined with error_correction, reconstruct_epochs or "
                              "dense_stats (they need the single pass)")
        if self.reconstruct_epochs < 0 or not self.reconstruct_lr > 0:
            raise ConfigError("prune.reconstruct_epochs must be >= 0 and prune.reconstruct_lr > 0")
        _positive("prune.blocksize", self.blocksize)
        if not self.percdamp >= 0:
            raise ConfigError(f"prune.percdamp={self.percdamp!r} is not valid: it must be >= 0")
        for rx in list(self.targets) + list(self.ignore):
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"prune.targets/ignore has an invalid regex {rx!r}: {e}") from None


    def _check_structured(self) -> None:
        _choice("prune.importance", self.importance, IMPORTANCES)
        _choice("prune.attn_unit", self.attn_unit, ("kv_group", "query_head", "none"))
        _choice("prune.activation_metric", self.activation_metric, ("fluctuation", "wanda"))
        _choice("prune.lora_base", self.lora_base, ("fp", "8bit", "4bit"))
        _choice("prune.lora_score", self.lora_score, LORA_SCORES)
        if not isinstance(self.ratio, (int, float)) or not 0.0 < float(self.ratio) < 0.95:
            raise ConfigError(f"prune.ratio={self.ratio!r} is not valid: it must be in (0, 0.95) (a fraction of the "
                              "decoder-block parameters)")
        if self.attn_fraction is not None and not 0.0 <= float(self.attn_fraction) < 1.0:
            raise ConfigError(f"prune.attn_fraction={self.attn_fraction!r} is not valid: it must be in [0, 1) or null")
        _positive("prune.round_to", self.round_to)
        _positive("prune.lora_steps", self.lora_steps)
        _positive("prune.lora_every", self.lora_every)
        if self.lora_r is not None:
            _positive("prune.lora_r", self.lora_r)
        for k in ("protect_first", "protect_last"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 0:
                raise ConfigError(f"prune.{k}={getattr(self, k)!r} is not valid: it must be an integer >= 0")
        if (self.protect_first or self.protect_last) and self.importance != "block" and self.uniform:
            raise ConfigError("prune.protect_first/protect_last with width pruning need prune.uniform=false: uniform "
                              "widths cut every block alike (so that stock from_pretrained reloads the model), and "
                              "protected blocks make them non-uniform")
        if not self.uniform and self.importance in ("lora", "block"):
            raise ConfigError(f"prune.uniform=false ranks MLP channels across blocks once; it needs prune.importance="
                              f"magnitude, activation or taylor, got {self.importance}")
        if not (0 <= self.lora_warmup < 1 and 0 <= self.lora_cooldown < 1 and self.lora_warmup + self.lora_cooldown < 1):
            raise ConfigError(f"prune.lora_warmup={self.lora_warmup} / lora_cooldown={self.lora_cooldown}: each in "
                              "[0, 1) and together below 1 (the ramp lies between them)")
        if self.bias_compensation and self.importance != "activation":
            raise ConfigError("prune.bias_compensation=true needs prune.importance=activation (it uses the input means "
                              "of the calibration pass)")
        if not 0 <= self.lora_ema < 1:
            raise ConfigError(f"prune.lora_ema={self.lora_ema!r} is not valid: it must be in [0, 1)")

    def needs_single_pass(self) -> str:
        """The option that only the single pass supports, or '' (``sequential=auto`` then picks it)."""
        for key in ("error_correction", "reconstruct_epochs", "dense_stats"):
            if getattr(self, key):
                return f"prune.{key}"
        return ""


@dataclass
class TrainConfig:
    method: str = "none"
    max_steps: int = 100
    micro_batch_size: int = 4
    seqlen: int = 512
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    precision: str = "fp32"
    activation_checkpointing: bool = False
    chunked_loss: int = 0  # >0: LM loss over chunks of this many tokens, logits recomputed in backward (single process)
    source: str = "wikitext2"  # training text: the calibration/validation text by default, never eval
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # regexes on the module names inside a decoder block (as prune.targets); default: every linear of every block
    lora_targets: List[str] = field(default_factory=lambda: [r".*"])
    qlora_bits: int = 4
    distill: bool = False
    distill_alpha: float = 0.5  # weight of the KD loss (1 - alpha on the LM loss)
    distill_temperature: float = 2.0
    log_every: int = 10
    eval_every: int = 0  # 0 = no periodic eval
    eval_before: bool = True  # perplexity before training too (metrics.ppl_before_train)
    save_every: int = 0
    resume: Optional[str] = None
    pin_memory: bool = False
    seed: int = 0

    def __post_init__(self):
        _choice("train.method", self.method, TRAIN_METHODS)
        _choice("train.optimizer", self.optimizer, ("adamw", "adamw_8bit", "paged_adamw_8bit", "adam_8bit", "sgd"))
        _choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        for k in ("max_steps", "micro_batch_size", "seqlen", "grad_accum", "lora_r", "log_every"):
            _positive(f"train.{k}", getattr(self, k))
        _choice("train.qlora_bits", self.qlora_bits, (4, 8))
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr!r} is not valid: it must be > 0")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"train.distill_alpha={self.distill_alpha!r} is not valid: it must be in [0, 1]")
        if not isinstance(self.chunked_loss, int) or self.chunked_loss < 0:
            raise ConfigError(f"train.chunked_loss={self.chunked_loss!r} is not valid: it must be 0 (off) or a positive "
                              "number of tokens per chunk")
        for rx in self.lora_targets:
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"train.lora_targets has an invalid regex {rx!r}: {e}") from None
        if self.chunked_loss and self.distill:
            raise ConfigError("train.chunked_loss needs train.distill=false (the KD loss needs the full logits)")


@dataclass
class QuantConfig:
    method: str = "none"  # none | bnb | rtn | gptq
    bits: int = 4  # rtn/gptq: 2-8; bnb: 4 (nf4/fp4) or 8 (LLM.int8)
    group_size: int = 64  # rtn/gptq: input columns per scale (-1 = per output channel); must divide every width
    symmetric: bool = True  # rtn/gptq: symmetric grid (no zero point) or asymmetric
    mse: bool = False  # rtn/gptq: search each group's clipping range for the least squared rounding error
    # gptq
    act_order: bool = True  # columns by decreasing Hessian diagonal, with static groups (no per-row g_idx)
    # gptq after prune=sparsegpt: choose the mask and quantize in one column loop, inside the prune stage
    # (false: the two-pass form, SparseGPT then GPTQ with the pruned weights held at zero)
    joint: bool = False
    blocksize: int = 128  # columns per lazy batch update
    percdamp: float = 0.01  # relative damping of H (raised automatically if H is not positive definite)
    damp_mode: str = "mean"  # mean | median of diag(H)
    sequential: str = "auto"  # true: each linear on the inputs left by the quantized ones before it (true-sequential)
    memory_budget: float = 0.5  # sequential=auto: fraction of the free memory the single pass may use
    offload: bool = False
    targets: List[str] = field(default_factory=lambda: [r".*"])  # regexes on module names inside a block
    ignore: List[str] = field(default_factory=list)
    # bnb
    bnb_quant_type: str = "nf4"  # 4-bit: nf4 | fp4
    bnb_double_quant: bool = True  # 4-bit: quantize the block scales too
    bnb_compute_dtype: str = "float32"  # 4-bit: float32 | bfloat16 | float16
    bnb_int8_threshold: float = 6.0  # 8-bit: LLM.int8 outlier threshold

    def __post_init__(self):
        _choice("quant.method", self.method, QUANT_METHODS)
        if self.method == "bnb":
            _choice("quant.bits", self.bits, (4, 8))
        else:
            _choice("quant.bits", self.bits, (2, 3, 4, 5, 6, 7, 8))
        if self.group_size != -1:
            _positive("quant.group_size", self.group_size)
        seq = self.sequential
        self.sequential = ("true" if seq else "false") if isinstance(seq, bool) else str(seq).lower()
        _choice("quant.sequential", self.sequential, ("auto", "true", "false"))
        if not isinstance(self.memory_budget, (int, float)) or not 0 < float(self.memory_budget) <= 1:
            raise ConfigError(f"quant.memory_budget={self.memory_budget!r} is not valid: it must be in (0, 1]")
        _choice("quant.damp_mode", self.damp_mode, ("mean", "median"))
        _positive("quant.blocksize", self.blocksize)
        if not self.percdamp >= 0:
            raise ConfigError(f"quant.percdamp={self.percdamp!r} is not valid: it must be >= 0")
        _choice("quant.bnb_quant_type", self.bnb_quant_type, ("nf4", "fp4"))
        _choice("quant.bnb_compute_dtype", self.bnb_compute_dtype, ("float32", "bfloat16", "float16"))
        for rx in list(self.targets) + list(self.ignore):
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"quant.targets/ignore has an invalid regex {rx!r}: {e}") from None


@dataclass
class OutputConfig:
    save_model: bool = False  # save the compressed model (safetensors) into the run dir
    # a finished run of the same config made by another code version (package version + git commit) is
    # run again unless this is true (then it is reused as it is); not part of a run's identity
    reuse_other_code: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # the order the stages run in (each runs when its method is not none), e.g. [prune, quant, train]
    # for recovery training on the quantized model
    stages: List[str] = field(default_factory=lambda: ["prune", "train", "quant"])
    seed: int = 0
    description: str = ""  # set by recipes: one line on what the experiment is for

    def __post_init__(self):
        order = list(self.stages)
        for s in order:
            _choice("stages", s, STAGE_NAMES)
        if len(set(order)) != len(order):
            raise ConfigError(f"stages={order} names a stage twice. Valid: an order of {', '.join(STAGE_NAMES)}")
        for s in STAGE_NAMES:
            if s not in order and getattr(self, s).method != "none":
                raise ConfigError(f"{s}.method={getattr(self, s).method!r} but stages={order} leaves the {s} stage out")
        if (self.quant.method != "none" and self.train.method != "none"
                and order.index("train") > order.index("quant")):
            raise ConfigError(f"stages={order} trains after quantizing: not supported yet (adapters on a quantized "
                              "base would have to stay unmerged and be saved beside it). Put train before quant, "
                              "e.g. stages=[prune, train, quant]")
        if self.quant.joint:
            self._check_joint(order)
        q = self.quant
        if (self.prune.method == "structured" and q.method in ("rtn", "gptq") and q.group_size != -1
                and self.prune.round_to % q.group_size):
            raise ConfigError(f"prune.round_to={self.prune.round_to} with quant.group_size={q.group_size}: the kept MLP "
                              "width must stay divisible by the quant group; set prune.round_to to a multiple of "
                              f"{q.group_size} (e.g. prune.round_to={q.group_size})")

    def _check_joint(self, order: List[str]) -> None:
        q, p = self.quant, self.prune
        if q.method != "gptq" or p.method != "sparsegpt":
            raise ConfigError(f"quant.joint=true chooses SparseGPT's mask inside GPTQ's column loop: it needs "
                              f"prune=sparsegpt and quant=gptq, got prune={p.method}, quant={q.method}")
        between = order[order.index("prune") + 1:order.index("quant")] if order.index("prune") < order.index("quant") \
            else None
        if between is None or any(getattr(self, s).method != "none" for s in between):
            raise ConfigError(f"quant.joint=true needs the quant stage right after the prune stage, got stages={order}")
        if list(q.targets) != [r".*"] or list(q.ignore):
            raise ConfigError("quant.joint=true quantizes the modules the prune stage selects (prune.targets/ignore); "
                              f"leave quant.targets/ignore at their defaults, got {list(q.targets)}/{list(q.ignore)}")
        if p.reconstruct_epochs:
            raise ConfigError("quant.joint=true with prune.reconstruct_epochs > 0: block reconstruction after the "
                              "joint column loop would move the quantized weights off their grid. Use the two-pass "
                              "form (quant.joint=false) or prune.reconstruct_epochs=0")

    def is_dense_baseline(self) -> bool:
        return all(getattr(self, s).method == "none" for s in STAGE_NAMES)


def validate(cfg) -> Config:
    """Turn a composed DictConfig into a checked :class:`Config` (raises :class:`ConfigError`)."""
    from omegaconf import OmegaConf

    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf wraps __post_init__ errors; surface ours
        cause = e
        while cause is not None:
            if isinstance(cause, ConfigError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise ConfigError(str(e)) from None
    if not isinstance(obj, Config):
        raise ConfigError(f"composed config is {type(obj).__name__}, expected Config")
    return obj


def register_configs() -> None:
    """Register the schemas (and the recipes) with Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)

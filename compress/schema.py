"""Typed configs of the groups that are not methods: ``model``, ``calib``, ``eval``, ``train``, ``output``.

Every value is checked in ``__post_init__``, naming the key and the valid choices, before torch is
imported or a model loads. The method groups (``prune``, ``quant``, ``transform``) get their configs from
the methods themselves (:mod:`compress.registry`); :mod:`compress.config` composes the whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

from compress.core.config import choice as _choice
from compress.core.config import dataset_key, positive as _positive, regexes
from compress.core.errors import ConfigError

TRAIN_METHODS = ("none", "full", "lora", "qlora")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EMBEDDED_MODEL = "smollm2-135m"


@dataclass
class ModelConfig:
    name: str = EMBEDDED_MODEL  # the embedded default, a Hugging Face id, or a local directory
    dtype: str = "float32"
    device: str = "auto"  # auto = cuda if available, else cpu
    trust_remote_code: bool = False
    revision: Optional[str] = None
    attn_implementation: Optional[str] = None
    # where the weights live while the stages run: memory (loaded whole), disk (built on the meta device; each
    # block read from the checkpoint when its turn comes, compressed, written to the output and freed), or
    # auto (disk when the loaded model would take more than half of the available host memory)
    load: str = "auto"

    def __post_init__(self):
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.load", self.load, ("auto", "memory", "disk"))
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
        regexes("train.lora_targets", self.lora_targets)
        if self.chunked_loss and self.distill:
            raise ConfigError("train.chunked_loss needs train.distill=false (the KD loss needs the full logits)")


@dataclass
class OutputConfig:
    save_model: bool = False  # save the compressed model (safetensors) into the run dir
    # after saving, reload the checkpoint with stock from_pretrained in a fresh process (no compress import)
    # and compare the weights' fingerprint; a checkpoint that does not reload fails the run
    verify_reload: bool = True
    # when the stage's own format does not reload, save the stage's working alternative instead (e.g. the
    # dequantized grid values with the quantization recorded beside them) and say so in the record
    save_fallback: bool = False
    # a finished run of the same config made by another code version (package version + git commit) is
    # run again unless this is true (then it is reused as it is); not part of a run's identity
    reuse_other_code: bool = False
    # calibration walks (prune, quant) checkpoint every finished block into <run dir>/checkpoint/, and a run
    # started again in the same run directory with the same config, code, model and calibration data
    # continues from the last finished block (anything else is refused, naming what changed)
    checkpoint: bool = True
    keep_checkpoint: bool = False  # keep <run dir>/checkpoint/ after the run ended ok (default: deleted)

"""The shared trainer: recovery fine-tuning (full, LoRA, QLoRA), optional distillation, exact sparsity.

Built on ``accelerate`` (device placement, mixed precision, gradient accumulation, DDP/FSDP under
``accelerate launch``). Memory tricks are config switches (``train.*``):

* ``activation_checkpointing``: recompute decoder-block activations in backward;
* ``grad_accum``: k micro-batches give the update of one batch k times larger (losses are scaled 1/k);
* ``optimizer``: ``adamw`` (torch), ``adamw_8bit`` / ``paged_adamw_8bit`` / ``adam_8bit`` (bitsandbytes);
* ``precision``: ``fp32``, ``bf16``, ``fp16`` autocast with fp32 master weights (TF32 on for CUDA matmuls
  while training; the process-global switches are restored when ``fit`` returns);
* ``method``: ``full``, ``lora`` (peft), ``qlora`` (4- or 8-bit frozen base via bitsandbytes);
* ``callbacks``: hooks into the loop (before the optimizer step, at the end of a step) for what
  trains alongside, e.g. the LoRA importance estimator of structured pruning;
* ``pin_memory``; the loss is read back (``.item()``) only every ``log_every`` steps.

Sparsity stays exact: the zero pattern of every prunable linear is recorded before training; full
fine-tuning masks gradients and re-zeroes after each optimizer step; LoRA adapters are merged and
the mask re-applied. The stage then checks every pruned weight and N:M pattern and fails loudly.

Distillation (``distill=true``): KL(teacher || student) on temperature-softened logits, mixed with the
LM loss by ``distill_alpha``. The teacher is the dense model, kept in memory and run on the fly (one
extra forward per step, no cache): caching teacher logits would cost ``tokens x vocab`` floats (about
100 MB per 512-token sequence for a 49k vocabulary), more than the 135M-parameter teacher itself.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.calibration.targets import resolve_targets
from compress.core.masks import check_nm
from compress.core.modules import weight_matrix
from compress.core.runtime import scoped_torch_flags, seed_everything
from compress.schema import TrainConfig


# ---------------------------------------------------------------- masks
def _block_linears(model: nn.Module) -> Dict[str, nn.Module]:
    """Every linear-like module of the decoder blocks, named ``"<block>.<name>"`` (the one resolver)."""
    return resolve_targets(model).flat()


def record_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Zero patterns (True = keep) of the block linears that are actually sparse."""
    masks = {}
    for name, mod in _block_linears(model).items():
        w = mod.weight
        if w.dtype in (torch.float32, torch.float16, torch.bfloat16) and bool((w == 0).any()):
            keep = w != 0
            if float((~keep).float().mean()) > 0.01:  # a real pruning mask, not stray zeros
                masks[name] = keep
    return masks


def check_masks(model: nn.Module, masks: Dict[str, torch.Tensor], nm=None) -> Dict:
    """Every pruned weight still zero, and any N:M pattern intact."""
    lin = _block_linears(model)
    bad, nm_bad = [], []
    for name, keep in masks.items():
        w = lin[name].weight
        if bool((w[~keep.to(w.device)] != 0).any()):
            bad.append(name)
        if nm is not None and not check_nm(weight_matrix(lin[name]), *nm):
            nm_bad.append(name)
    return {"masked_modules": len(masks), "pruned_weights_still_zero": not bad, "violations": bad[:10],
            "nm_pattern": f"{nm[0]}:{nm[1]}" if nm else None, "nm_exact": (not nm_bad) if nm else None}


class MaskKeeper:
    """Keeps pruned weights at exactly zero during full fine-tuning (gradient masks + re-zero after steps)."""

    def __init__(self, model: nn.Module, masks: Dict[str, torch.Tensor]):
        lin = _block_linears(model)
        self.pairs = [(lin[n].weight, m.to(lin[n].weight.device)) for n, m in masks.items()]
        self.handles = [w.register_hook(lambda g, m=m: g * m) for w, m in self.pairs if w.requires_grad]

    @torch.no_grad()
    def apply(self):
        for w, m in self.pairs:
            w.mul_(m)

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- building blocks
def build_optimizer(params, cfg: TrainConfig):
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adam_8bit": bnb.optim.Adam8bit}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer != "adam_8bit" else cls(params, lr=cfg.lr)


def build_scheduler(opt, cfg: TrainConfig):
    def f(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine to zero
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def apply_lora(model: nn.Module, cfg: TrainConfig):
    """LoRA adapters on the block linears that ``train.lora_targets`` selects: regexes on the names inside
    a block, resolved by the same resolver as ``prune.targets`` (default: every linear of every block,
    whatever the family calls them; ``Conv1D`` included)."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, cfg.lora_targets)
    if len(targets) == 0:
        raise ValueError(f"train.lora_targets={list(cfg.lora_targets)} selects no linear of {type(model).__name__}; "
                         f"linears in block 0: {targets.linear_names}")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets.qualified_names(), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def quantize_base_for_qlora(model: nn.Module, cfg: TrainConfig, device: str):
    """Reload the (possibly pruned) weights into a bitsandbytes-quantized copy of the model."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import prepare_model_for_kbit_training

    if cfg.qlora_bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        qm = AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.float32,
                                                  device_map={"": device})
    return prepare_model_for_kbit_training(qm, use_gradient_checkpointing=cfg.activation_checkpointing)


# ---------------------------------------------------------------- the loop
class Trainer:
    """One trainer for every training need. ``fit()`` returns the (merged, plain) model."""

    def __init__(self, model, cfg: TrainConfig, train_ids: torch.Tensor, out_dir=None, teacher=None,
                 eval_fn=None, masks: Optional[Dict[str, torch.Tensor]] = None, device: str = "cpu",
                 callbacks: Optional[List] = None):
        from accelerate import Accelerator

        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir else None
        self.device = device
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
        self.acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp,
                               cpu=device == "cpu")
        seed_everything(cfg.seed)
        self.masks = masks if masks is not None else record_masks(model)
        self.teacher = teacher
        self.eval_fn = eval_fn
        self.train_ids = train_ids
        if cfg.method == "qlora":
            model = quantize_base_for_qlora(model, cfg, str(self.acc.device))
        if cfg.activation_checkpointing:
            model.config.use_cache = False
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        if cfg.method in ("lora", "qlora"):
            model = apply_lora(model, cfg)
        self.keeper = MaskKeeper(model, self.masks) if cfg.method == "full" and self.masks else None
        self.opt = build_optimizer(model.parameters(), cfg)
        self.sched = build_scheduler(self.opt, cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        self.loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train_ids), batch_size=cfg.micro_batch_size,
                                                  shuffle=True, generator=g, drop_last=True, pin_memory=cfg.pin_memory)
        if len(self.loader) == 0:
            raise ValueError(f"train data has {len(train_ids)} sequences, fewer than train.micro_batch_size={cfg.micro_batch_size}")
        # the scheduler stays ours, stepped once per optimizer step: accelerate's wrapper would step it once per
        # process (a schedule in per-sample terms), so under DDP the lr would no longer match a one-process run
        # with the same global batch
        self.model, self.opt, self.loader = self.acc.prepare(model, self.opt, self.loader)
        self.acc.register_for_checkpointing(self.sched)
        if teacher is not None:
            self.teacher = teacher.to(self.acc.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.step = 0
        self.history: List[Dict] = []
        # objects with any of on_before_optimizer_step(trainer) (the step's gradients are complete),
        # on_step_end(trainer) (after the update; ``trainer.step`` counts it): e.g. the LoRA estimator
        self.callbacks = list(callbacks or [])

    def _callback(self, event: str) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self)

    # -- loss
    def chunked_lm_loss(self, batch):
        """Causal-LM loss without materialising the full logits: the LM head and cross-entropy run over
        chunks of tokens under activation checkpointing, so at most one chunk of logits is alive. For a
        49k vocabulary the full fp32 logits of 4 x 512 tokens (and their gradient) are about 0.8 GB.
        Calls the decoder directly, so it is for single-process runs (not under DDP/FSDP wrappers)."""
        from torch.utils.checkpoint import checkpoint

        base = self.acc.unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        h = base.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
        head = base.get_output_embeddings()
        h = h[:, :-1].reshape(-1, h.shape[-1])
        y = batch[:, 1:].reshape(-1)

        def piece(hh, yy):
            return F.cross_entropy(head(hh).float(), yy, reduction="sum")

        n = self.cfg.chunked_loss
        total = sum(checkpoint(piece, h[i:i + n], y[i:i + n], use_reentrant=False) for i in range(0, y.numel(), n))
        return total / y.numel()

    def loss_fn(self, batch):
        if self.cfg.chunked_loss:  # config validation excludes it with distillation
            return self.chunked_lm_loss(batch)
        out = self.model(input_ids=batch, labels=batch, use_cache=False)
        loss = out.loss
        if self.teacher is not None and self.cfg.distill:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=batch, use_cache=False).logits
            T = self.cfg.distill_temperature
            s = F.log_softmax(out.logits[:, :-1].float() / T, dim=-1)
            t = F.log_softmax(t_logits[:, :-1].float() / T, dim=-1)
            kd = F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean") * T * T
            loss = (1 - self.cfg.distill_alpha) * loss + self.cfg.distill_alpha * kd
        return loss

    # -- checkpointing
    def save_checkpoint(self, path):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.acc.save_state(str(path / "state"))  # model/adapters, optimizer, scheduler, RNG (safetensors)
        if self.acc.is_main_process:
            (path / "trainer.json").write_text(json.dumps({"step": self.step, "history": self.history}))
        self.acc.wait_for_everyone()

    def load_checkpoint(self, path):
        path = Path(path)
        self.acc.load_state(str(path / "state"))
        meta = json.loads((path / "trainer.json").read_text())
        self.step = meta["step"]
        self.history = meta["history"]

    def _batches(self):
        epoch = 0
        while True:
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(epoch)
            for (batch,) in self.loader:
                yield batch
            epoch += 1

    def fit(self, resume: Optional[str] = None, stop_after: Optional[int] = None):
        """Train (TF32 on for CUDA matmuls during training only: the global switches are restored after)."""
        with scoped_torch_flags():
            if self.acc.device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            return self._fit(resume, stop_after)

    def _fit(self, resume: Optional[str] = None, stop_after: Optional[int] = None):
        cfg = self.cfg
        # accelerate's gradient state is a process-wide singleton: re-assert ours (another Trainer may exist)
        self.acc.gradient_accumulation_steps = cfg.grad_accum
        if resume:
            self.load_checkpoint(resume)
        self.model.train()
        batches = self._batches()
        # skip what a resumed run already consumed, so that it sees the same data
        for _ in range(self.step * cfg.grad_accum):
            next(batches)
        pending = None
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {cfg.method}", unit="step")
        while self.step < cfg.max_steps:
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                with self.acc.accumulate(self.model):
                    loss = self.loss_fn(batch)
                    self.acc.backward(loss)
                    if self.acc.sync_gradients:
                        self._callback("on_before_optimizer_step")
                        self.opt.step()
                        self.sched.step()
                        self.opt.zero_grad(set_to_none=True)
                        if self.keeper is not None:
                            self.keeper.apply()
                pending = loss.detach() if pending is None else pending + loss.detach()
            self.step += 1
            self._callback("on_step_end")
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                if self.acc.num_processes > 1:  # DDP: the global batch's loss, the mean over the ranks' shares
                    pending = self.acc.reduce(pending, reduction="mean")
                rec = {"step": self.step, "loss": float(pending) / cfg.grad_accum,  # one host sync per log
                       "lr": self.sched.get_last_lr()[0], "seconds": time.perf_counter() - t0}
                self.history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                self._log(rec)
            pending = None
            if cfg.eval_every and self.eval_fn and self.step % cfg.eval_every == 0:
                self.model.eval()
                ppl = self.eval_fn(self.acc.unwrap_model(self.model))
                self.model.train()
                self._log({"step": self.step, "eval_ppl": ppl})
                self.history.append({"step": self.step, "eval_ppl": ppl})
            if cfg.save_every and self.out_dir and self.step % cfg.save_every == 0:
                self.save_checkpoint(self.out_dir / "checkpoints" / f"step-{self.step}")
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        self.model.eval()
        return self.finalize()

    def _log(self, rec: Dict):
        if self.out_dir is None or not self.acc.is_main_process:  # DDP: rank 0 writes
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "train_log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds", "eval_ppl"])
            if new:
                w.writeheader()
            w.writerow(rec)
        try:  # optional TensorBoard
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            return
        if not hasattr(self, "_tb"):
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        for k, v in rec.items():
            if k != "step":
                self._tb.add_scalar(f"train/{k}", v, rec["step"])

    def finalize(self):
        """Unwrap, merge adapters (mask re-applied), return a plain model."""
        model = self.acc.unwrap_model(self.model)
        if self.keeper is not None:
            self.keeper.remove()
        if self.cfg.method in ("lora", "qlora"):
            if self.cfg.method == "qlora":
                return model  # 4/8-bit base: adapters stay separate (merging would dequantize)
            model = model.merge_and_unload()
            lin = _block_linears(model)
            with torch.no_grad():
                for name, keep in self.masks.items():
                    lin[name].weight.mul_(keep.to(lin[name].weight.device))
        if self.cfg.activation_checkpointing and hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        return model

"""LoRAPrune: structural importance from the LoRA factors while fine-tuning, pruned on a schedule.

With a frozen weight W and a LoRA update s·BA (A ``[r, in]``, B ``[out, r]``), one SGD step of unit
rate on A and B moves the merged weight W + s·BA by

    s·((B - G_B)(A - G_A) - BA) = -s·(G_B A + B G_A - G_B G_A),

so ``Ĝ = s·(G_B A + B G_A - G_B G_A)`` (:func:`lora_grad_estimate`) stands in for dL/dW without ever
forming the full gradient: its first two terms are s²·(G AᵀA + B Bᵀ G), the true gradient G projected
on the LoRA subspaces. Each weight is scored ``((W + s·BA) ⊙ Ĝ)²`` (:func:`lora_weight_scores`; or its
absolute value, or the group's signed sum squared: ``prune.lora_score``), summed
per group and normalised per module (:func:`compress.structured.scoring.group_scores`), and smoothed
by an exponential moving average over steps.

:class:`LoraPruneCallback` plugs into the shared trainer (``on_before_optimizer_step`` sees the complete
gradients of a step, ``on_step_end`` prunes): groups are masked progressively on a cubic ramp, none in
the warm-up (B starts at zero, so the first scores are noise), all of the plan's groups from the start of
the cool-down on. Masked groups never come back. The frozen base may be fp32/bf16 or bitsandbytes
8/4-bit (QLoRA), dequantized per module only while its scores are computed.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from compress.calibration.blocks import find_blocks
from compress.calibration.roles import ModelStructure, block_structure
from compress.core.modules import dense_weight
from compress.data import packed_sequences
from compress.registry import register
from compress.structured.scoring import Importance, ImportanceContext, ImportanceMethod, attn_scores, group_scores
from compress.structured.surgery import Keep, WidthPlan, zero_inputs_hook
from compress.training import Trainer


def lora_grad_estimate(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s·(G_B A + B G_A - G_B G_A)``: minus the change of the merged weight under one unit SGD step."""
    A, B, gA, gB = (t.float() for t in (A, B, gA, gB))
    return scaling * (gB @ A + B @ gA - gB @ gA)


def base_weight(layer) -> torch.Tensor:
    """The frozen base weight of a peft LoRA layer as a float ``[out, in]`` tensor (bitsandbytes dequantized)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    return dense_weight(base).detach().float()


def lora_weight_scores(layer, adapter: str = "default", score: str = "element_sq") -> Optional[torch.Tensor]:
    """``((W + s·BA) ⊙ Ĝ)²`` for one peft LoRA layer (``element_abs``: its absolute value; ``group_sq``:
    the signed product, squared per group later), or None before its factors have gradients."""
    A = layer.lora_A[adapter].weight
    B = layer.lora_B[adapter].weight
    if A.grad is None or B.grad is None:
        return None
    s = layer.scaling[adapter]
    g = lora_grad_estimate(A.detach(), B.detach(), A.grad, B.grad, s)
    merged = base_weight(layer) + s * (B.detach().float() @ A.detach().float())
    prod = merged * g
    if score == "element_sq":
        return prod.square()
    if score == "element_abs":
        return prod.abs()
    if score == "group_sq":
        return prod
    raise ValueError(f"unknown LoRA score {score!r}")


def cubic_fraction(step: int, total: int, warmup: float, cooldown: float) -> float:
    """Fraction of the final removal reached after ``step`` completed steps: 0 in the warm-up, a cubic
    ramp 1 - (1 - u)³, 1 from the start of the cool-down."""
    t0 = int(round(warmup * total))
    t1 = max(t0 + 1, total - int(round(cooldown * total)))
    if step <= t0:
        return 0.0
    if step >= t1:
        return 1.0
    u = (step - t0) / (t1 - t0)
    return 1.0 - (1.0 - u) ** 3


def _lora_layers(model: nn.Module, structure: ModelStructure) -> List[Dict[str, nn.Module]]:
    """Per block, role -> the peft LoRA layer wrapping that role's linear (found by the role names; roles
    of one fused module share its layer)."""
    _, blocks = find_blocks(model)
    names = structure.pattern.roles
    out = []
    for block in blocks:
        d = {}
        for r, rel in names.items():
            mod = block.get_submodule(rel)
            if not hasattr(mod, "lora_A"):
                raise RuntimeError(f"LoRA estimator: {rel} has no LoRA adapter (train.lora_targets must cover every "
                                   "structured role)")
            d[r] = mod
        out.append(d)
    return out


class LoraPruneCallback:
    """Scores, schedules and masks during LoRA fine-tuning (see the module docstring)."""

    def __init__(self, structure: ModelStructure, plan: WidthPlan, total_steps: int, warmup: float = 0.2,
                 cooldown: float = 0.2, ema: float = 0.9, every: int = 1, round_to: int = 1,
                 score: str = "element_sq"):
        self.structure, self.plan, self.total, self.score = structure, plan, total_steps, score
        self.warmup, self.cooldown, self.ema, self.every, self.round_to = warmup, cooldown, ema, every, round_to
        self.scores: List[Optional[Dict[str, torch.Tensor]]] = [None] * len(structure.blocks)
        self.layers: Optional[List[Dict[str, nn.Module]]] = None
        self.handles = []
        self.masks = []  # per block: (o column mask, down column mask), updated in place
        self.removed_attn = [set() for _ in structure.blocks]  # KV groups, or query heads
        self.removed_ch = [set() for _ in structure.blocks]
        self.history: List[Dict] = []

    # -- set-up on the trainer's (peft) model
    def attach(self, model: nn.Module) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.layers = _lora_layers(base, self.structure)
        for b, lay in zip(self.structure.blocks, self.layers):
            dev = lay["o"].lora_A["default"].weight.device
            om = torch.ones(b.n_heads * b.head_dim, device=dev)
            dm = torch.ones(b.intermediate, device=dev)
            self.masks.append((om, dm))
            for role, mask in (("o", om), ("down", dm)):
                self.handles.append(zero_inputs_hook(lay[role], mask))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- trainer callbacks
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer) -> None:
        if self.layers is None:
            self.attach(trainer.model)
        for i, (b, lay) in enumerate(zip(self.structure.blocks, self.layers)):
            S, per_layer = {}, {}
            for r, layer in lay.items():
                if id(layer) not in per_layer:  # a fused module's layer is scored once, then sliced per role
                    per_layer[id(layer)] = lora_weight_scores(layer, score=self.score)
                s = per_layer[id(layer)]
                if s is not None:
                    a, e = b.parts[r]
                    S[r] = s[a:e]
            if not S:
                continue
            new = group_scores(b, S, post=torch.square if self.score == "group_sq" else None)
            old = self.scores[i]
            self.scores[i] = new if old is None else {k: self.ema * old[k] + (1 - self.ema) * new[k] for k in new}

    def on_step_end(self, trainer) -> None:
        if self.layers is None:
            self.attach(trainer.model)
        step = trainer.step
        if step % self.every and step < self.total:
            return
        self.prune_to(cubic_fraction(step, self.total, self.warmup, self.cooldown), step)

    # -- pruning
    def _count(self, full: int, frac: float, multiple: int = 1) -> int:
        if frac >= 1.0:
            return full
        return int(round(full * frac / multiple)) * multiple if multiple > 1 else int(round(full * frac))

    @torch.no_grad()
    def prune_to(self, frac: float, step: int = -1) -> None:
        p = self.plan
        na = self._count(p.attn_remove, frac)
        nc = self._count(p.channel_remove, frac, self.round_to)
        for i, b in enumerate(self.structure.blocks):
            s = self.scores[i]
            if s is None and (na or nc):
                raise RuntimeError("LoRA estimator: pruning was scheduled before any LoRA gradient was seen; "
                                   "increase prune.lora_warmup or prune.lora_steps")
            om, dm = self.masks[i]
            if p.attn_remove and p.attn_unit == "kv_group":
                need = na - len(self.removed_attn[i])
                if need > 0:
                    sc = attn_scores(b, s, "kv_group").clone()
                    sc[list(self.removed_attn[i])] = float("inf")
                    for g in torch.argsort(sc, stable=True)[:need].tolist():
                        self.removed_attn[i].add(g)
                        for h in range(g * b.group_size, (g + 1) * b.group_size):
                            om[h * b.head_dim:(h + 1) * b.head_dim] = 0
            elif p.attn_remove and p.attn_unit == "query_head":
                sc = attn_scores(b, s, "query_head").clone()
                for g in range(b.n_kv):
                    have = [h for h in self.removed_attn[i] if h // b.group_size == g]
                    need = na - len(have)
                    if need <= 0:
                        continue
                    row = sc[g].clone()
                    for h in have:
                        row[h - g * b.group_size] = float("inf")
                    for j in torch.argsort(row, stable=True)[:need].tolist():
                        h = g * b.group_size + j
                        self.removed_attn[i].add(h)
                        om[h * b.head_dim:(h + 1) * b.head_dim] = 0
            need = nc - len(self.removed_ch[i])
            if need > 0:
                sc = s["channels"].clone()
                sc[list(self.removed_ch[i])] = float("inf")
                idx = torch.argsort(sc, stable=True)[:need].tolist()
                self.removed_ch[i].update(idx)
                dm[idx] = 0
        self.history.append({"step": step, "fraction": frac, "attn_removed": na, "channels_removed": nc})

    def keeps(self) -> List[Keep]:
        out = []
        for i, b in enumerate(self.structure.blocks):
            if self.plan.attn_unit == "kv_group":
                kv = [g for g in range(b.n_kv) if g not in self.removed_attn[i]]
                q = [h for h in range(b.n_heads) if h // b.group_size in kv]
            else:
                kv = list(range(b.n_kv))
                q = [h for h in range(b.n_heads) if h not in self.removed_attn[i]]
            ch = [c for c in range(b.intermediate) if c not in self.removed_ch[i]]
            out.append(Keep(q, kv, ch))
        return out


@register("importance", "lora", owns=("lora_steps", "lora_warmup", "lora_cooldown", "lora_ema", "lora_every",
                                      "lora_base", "lora_score", "lora_r"))
class LoraImportance(ImportanceMethod):
    """LoRAPrune: groups scored from the LoRA factors and their gradients while LoRA fine-tunes, masked on a cubic schedule"""

    needs_calibration = False  # it trains on the train group's text instead

    def __call__(self, ictx: ImportanceContext) -> Importance:
        """Train LoRA adapters with the estimator attached; merge them; return the kept groups."""
        p, t = ictx.cfg, ictx.train_cfg
        structure, model = ictx.structure, ictx.model
        rank = p.lora_r or t.lora_r
        alpha = t.lora_alpha * rank / t.lora_r  # the same scaling s = alpha / r as the train group's
        tcfg = dataclasses.replace(t, method="lora" if p.lora_base == "fp" else "qlora",
                                   qlora_bits=8 if p.lora_base == "8bit" else 4, max_steps=p.lora_steps,
                                   eval_every=0, save_every=0, resume=None, distill=False, lora_targets=[r".*"],
                                   lora_r=rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha)
        ids, data_info = packed_sequences(ictx.tokenizer, tcfg.source, tcfg.seqlen)
        cb = LoraPruneCallback(structure, ictx.plan, p.lora_steps, p.lora_warmup, p.lora_cooldown, p.lora_ema,
                               p.lora_every, p.round_to, score=p.lora_score)
        spill = None
        if tcfg.method == "qlora":  # the full-precision weights wait on disk while the quantized base trains
            spill = tempfile.TemporaryDirectory(prefix="compress-lora-fp-")
            model.save_pretrained(spill.name, safe_serialization=True)
        trainer = Trainer(model, tcfg, ids, out_dir=Path(ictx.out_dir) / "lora_importance", masks={},
                          device=ictx.device, callbacks=[cb])
        if spill is not None:
            for prm in model.parameters():  # free them (the trainer holds its own quantized copy)
                prm.data = torch.empty(0, dtype=prm.dtype, device=prm.device)
        trained = trainer.fit()
        cb.detach()
        if tcfg.method == "qlora":  # merge s·BA into the full-precision weights of the original model
            state = {}
            for f in sorted(Path(spill.name).glob("*.safetensors")):
                state.update(load_file(str(f), device=str(ictx.device)))
            spill.cleanup()
            params = dict(model.named_parameters())  # tied weights are one Parameter: restored once
            missing = [n for n in params if n not in state and params[n].numel() == 0]
            unexpected = [n for n in state if n not in params]
            if missing or unexpected:
                raise RuntimeError(f"reloading the full-precision weights: missing={missing} unexpected={unexpected}")
            for n, tensor in state.items():
                params[n].data = tensor
            structure = block_structure(model)  # the modules now hold the reloaded weights
            base = trained.get_base_model() if hasattr(trained, "get_base_model") else trained
            with torch.no_grad():
                for b, lay in zip(structure.blocks, _lora_layers(base, structure)):
                    done = set()
                    for r, layer in lay.items():
                        if id(layer) in done:  # a fused module: one layer for its roles
                            continue
                        done.add(id(layer))
                        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
                        w = b.modules[r].weight
                        w.add_((s * (B.float() @ A.float())).to(w.dtype).to(w.device))
            del trained
        else:
            model = trained  # merged (peft merge_and_unload keeps the original linears, weights updated)
        info = {"steps": trainer.step, "tokens": trainer.step * tcfg.grad_accum * tcfg.micro_batch_size * tcfg.seqlen,
                "base": p.lora_base, "lora_r": tcfg.lora_r, "lora_alpha": tcfg.lora_alpha, "lr": tcfg.lr,
                "data": data_info, "schedule": cb.history[-3:],
                "final_loss": next((h["loss"] for h in reversed(trainer.history) if "loss" in h), None)}
        return Importance(keeps=cb.keeps(), model=model, info={"lora": info},
                          sections={"lora_importance_history": trainer.history})

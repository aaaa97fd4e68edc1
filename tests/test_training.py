"""The ML tests that catch silent failures in the shared trainer (tiny models, CPU)."""

import pytest
import torch

from compress.config import prune_config
from compress.schema import TrainConfig
from compress.stages.prune import prune_model
from compress.training import Trainer, check_masks, record_masks


def _ids(n=16, seqlen=32, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    base = dict(method="full", max_steps=4, micro_batch_size=4, seqlen=32, lr=1e-3, log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_when_overfitting_one_batch(tiny_model, tmp_path):
    model = tiny_model("llama")
    t = Trainer(model, _cfg(max_steps=30, micro_batch_size=4, lr=3e-3), _ids(4), out_dir=tmp_path)
    t.fit()
    losses = [h["loss"] for h in t.history]
    assert losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "train_log.csv").read_text().count("\n") == 31


def test_accumulation_equals_large_batch(tiny_model):
    ids = _ids(8)
    b = Trainer(tiny_model("qwen2", seed=1), _cfg(max_steps=1, micro_batch_size=2, grad_accum=2, optimizer="sgd",
                                                  lr=0.5), ids)
    a = Trainer(tiny_model("qwen2", seed=1), _cfg(max_steps=1, micro_batch_size=4, grad_accum=1, optimizer="sgd",
                                                  lr=0.5), ids)
    ma, mb = a.fit(), b.fit()  # both exist at once: each must keep its own accumulation setting
    with torch.no_grad():
        diffs = [float((pa - pb).abs().max()) for pa, pb in zip(ma.parameters(), mb.parameters())]
        moved = max(float((pa - p0).abs().max()) for pa, p0 in zip(ma.parameters(), tiny_model("qwen2", seed=1).parameters()))
    assert moved > 1e-3
    assert max(diffs) < 1e-5


def test_activation_checkpointing_same_loss_and_grads(tiny_model):
    """Our switch (train.activation_checkpointing) through our Trainer: the blocks really recompute in
    backward (checkpointing is on in the trained model), and the loss and every gradient of the first step
    equal those of the run without it."""

    class Grads:
        def __init__(self):
            self.grads = None

        def on_before_optimizer_step(self, trainer):
            self.grads = [p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None]

    out = {}
    for ckpt in (False, True):
        cb = Grads()
        t = Trainer(tiny_model("llama", seed=2), _cfg(max_steps=1, activation_checkpointing=ckpt), _ids(4), callbacks=[cb])
        assert t.acc.unwrap_model(t.model).is_activation_checkpointing is ckpt
        t.fit()
        out[ckpt] = (t.history[0]["loss"], cb.grads)
    assert out[False][0] == pytest.approx(out[True][0], rel=1e-6)
    assert len(out[False][1]) == len(out[True][1]) > 10
    for g0, g1 in zip(out[False][1], out[True][1]):
        assert torch.allclose(g0, g1, atol=1e-6)


@pytest.mark.parametrize("opt", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adam_steps_on_cpu(tiny_model, opt):
    import bitsandbytes as bnb

    model = tiny_model("llama", seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    t = Trainer(model, _cfg(optimizer=opt, max_steps=3, lr=1e-3), _ids(12))
    assert isinstance(t.opt.optimizer, bnb.optim.optimizer.Optimizer8bit)
    m = t.fit()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in t.history)
    assert any(not torch.equal(p0, p) for p0, p in zip(before, m.parameters()))
    state = t.opt.optimizer.state
    assert any(v.dtype == torch.uint8 for s in state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_masks_survive_training(tiny_model, calib_ids, method):
    model = tiny_model("llama", seed=4)
    prune_model(model, None, prune_config(method="wanda", pattern="2:4"), calib_ids=calib_ids, progress=False)
    masks = record_masks(model)
    assert len(masks) == 14
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    t = Trainer(model, _cfg(method=method, max_steps=5, lr=5e-3), _ids(8), masks=masks)
    out = t.fit()
    check = check_masks(out, masks, (2, 4))
    assert check["pruned_weights_still_zero"] and check["nm_exact"]
    after = out.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(before, after)  # it did train
    assert type(out).__name__ == "LlamaForCausalLM"  # LoRA merged back into a plain model


def test_resume_reproduces_uninterrupted_run(tiny_model, tmp_path):
    ids = _ids(16)
    full = Trainer(tiny_model("llama", seed=5), _cfg(max_steps=6, micro_batch_size=2, save_every=3), ids,
                   out_dir=tmp_path / "a")
    full.fit()
    part = Trainer(tiny_model("llama", seed=5), _cfg(max_steps=6, micro_batch_size=2), ids, out_dir=tmp_path / "b")
    part.fit(resume=str(tmp_path / "a" / "checkpoints" / "step-3"))
    la = [h["loss"] for h in full.history]
    lb = [h["loss"] for h in part.history]
    assert len(lb) == 6 and lb[:3] == la[:3]
    assert lb[3:] == pytest.approx(la[3:], rel=1e-6)


def test_same_seed_identical_losses(tiny_model):
    runs = [Trainer(tiny_model("gpt_neox", seed=6), _cfg(max_steps=4), _ids(16)) for _ in range(2)]
    for r in runs:
        r.fit()
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]


def _grads(student, teacher, **kw):
    """Gradients of the trainer's loss on one batch, for a copy of ``student``."""
    import copy

    t = Trainer(copy.deepcopy(student), _cfg(**kw), _ids(8), teacher=teacher)
    t.model.train()
    batch = _ids(4, seed=9)
    t.loss_fn(batch).backward()
    return {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def test_distillation_changes_the_gradients(tiny_model):
    """KD is really in the loss: with distill_alpha=0.5 the gradients differ from the LM loss alone; with
    alpha=0 they are the LM loss's exactly; and against a teacher identical to the student, pure KD
    (alpha=1) has zero gradient (the KL is at its minimum)."""
    teacher = tiny_model("llama", seed=7)
    student = tiny_model("llama", seed=7)
    prune_model(student, None, prune_config(method="magnitude", sparsity=0.5), progress=False)
    lm = _grads(student, teacher)
    kd = _grads(student, teacher, distill=True, distill_alpha=0.5)
    kd0 = _grads(student, teacher, distill=True, distill_alpha=0.0)
    assert lm.keys() == kd.keys() == kd0.keys() and len(lm) > 10
    assert all(torch.equal(lm[n], kd0[n]) for n in lm)
    diff = sum(float((lm[n] - kd[n]).norm()) for n in lm) / sum(float(lm[n].norm()) for n in lm)
    assert diff > 0.05
    same = _grads(tiny_model("llama", seed=7), tiny_model("llama", seed=7), distill=True, distill_alpha=1.0)
    assert max(float(g.abs().max()) for g in same.values()) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_backward_on_cpu(tiny_model, bits):
    """Real bitsandbytes quantized base (NF4 / int8) + LoRA adapters: loss goes down, base stays frozen."""
    import bitsandbytes as bnb

    model = tiny_model("llama", seed=8)
    t = Trainer(model, _cfg(method="qlora", qlora_bits=bits, max_steps=8, lr=5e-3, micro_batch_size=2), _ids(2))
    kinds = {type(m) for m in t.model.modules()}
    assert (bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt) in kinds
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    t.fit()
    assert t.history[-1]["loss"] < t.history[0]["loss"]


def test_chunked_loss_equals_full_loss_and_grads(tiny_model):
    ids = _ids(4)
    res = []
    for chunk in (0, 7):
        t = Trainer(tiny_model("llama", seed=9), _cfg(chunked_loss=chunk), ids)
        loss = t.loss_fn(ids)
        loss.backward()
        res.append((float(loss), [p.grad.clone() for p in t.model.parameters() if p.grad is not None]))
    assert res[0][0] == pytest.approx(res[1][0], rel=1e-5)
    for a, b in zip(res[0][1], res[1][1]):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "phi3", "gpt2", "gemma2"])
def test_default_lora_targets_cover_every_block_linear(tiny_model, family):
    """The default train.lora_targets (every linear of every block, through the prune stage's resolver)
    puts an adapter on each of them whatever the family calls them, Conv1D included; nothing outside the
    blocks (lm_head, embeddings) gets one."""
    from compress.calibration.targets import resolve_targets
    from compress.training import apply_lora

    model = tiny_model(family)
    names = set(resolve_targets(model).qualified_names())
    peft_model = apply_lora(model, TrainConfig(method="lora"))
    adapted = {n.replace("base_model.model.", "", 1) for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == names and len(names) >= 8


def test_lora_targets_that_select_nothing_are_refused(tiny_model):
    from compress.training import apply_lora

    with pytest.raises(ValueError, match="selects no linear"):
        apply_lora(tiny_model("opt"), TrainConfig(method="lora", lora_targets=["q_proj_typo"]))

"""Rotations of the residual stream (QuaRot, Ashkboos et al., NeurIPS 2024; SpinQuant, Liu et al., ICLR 2025,
with its rotations fixed rather than learned), as a transform of the quant stage (``transform=rotation``,
composed with ``quant=rtn|gptq`` and with or without 8-bit activations).

An orthogonal ``Q`` (a randomized Hadamard matrix, :func:`compress.core.hadamard.rotation`) spreads the
outlier features of the residual stream over all of them, which makes both the weights reading the stream
and the activations entering them easier to quantize. It is fused into the weights, so the float model's
outputs are unchanged and the checkpoint is a plain one (no module is added to the forward):

1. every RMSNorm's weight is folded into the linears that read its output (``W diag(g)``), and the norm's
   weight set to identity: a norm's per-feature weight does not commute with a rotation, its
   normalisation does (``rms(x Q) = rms(x)``);
2. the embeddings become ``E Q``; every linear reading the stream (q, k, v, gate, up, fused ones, the head)
   ``W Q``; every linear writing to it (o, down) ``Q^T W`` (and its bias ``b Q``);
3. optionally (``transform.rotate_v``, default true) the values and the attention output inside each
   block: every value head ``H^T W_v`` and every head's columns of o ``W_o H`` with one Hadamard ``H`` of
   the head size (GQA included: all heads share it).

Tied embeddings are untied (the head carries the final norm's weight, the embeddings do not): the saved
checkpoint has ``tie_word_embeddings=false`` and one more ``vocab x hidden`` matrix, recorded. Rotations
that must run online (QuaRot's Hadamard on the down projection's input, or on the KV cache) would need a
module stock transformers does not have, so the checkpoint would not reload stock: ``transform.online``
is refused. Refused by name: a norm with a bias or a mean subtraction (LayerNorm: OPT, GPT-NeoX), a norm
on the residual stream that no linear reads directly (the post-norms of Gemma-2/3 and OLMo-2), a model
whose linears are already pruned (a rotation makes every weight dense) and, before loading,
``model.load=disk`` (the rotation touches the whole model at once). The float model's logits before and
after are compared on a probe batch; more than ``1e-4`` relative (fp32) fails the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn

from compress.calibration.roles import block_structure
from compress.core.config import choice, non_negative
from compress.core.errors import ConfigError, UnsupportedModelError
from compress.core.hadamard import hadamard, rotation
from compress.core.modules import text_config
from compress.registry import MethodConfig, register


@dataclass
class RotationConfig(MethodConfig):
    method: str = "rotation"
    matrix: str = "hadamard"  # hadamard (randomized; random orthogonal where no Hadamard of that order is built) | random
    seed: int = 0  # the random signs / the Gaussian
    rotate_v: bool = True  # also rotate each value head and o's columns by a head-size Hadamard
    online: bool = False  # online rotations (down projection input): refused, see the module docstring

    def validate(self) -> None:
        super().validate()
        choice(self.key("matrix"), self.matrix, ("hadamard", "random"))
        non_negative(self.key("seed"), self.seed)
        if self.online:
            raise ConfigError(f"{self.key('online')}=true: an online rotation (a Hadamard applied to the down "
                              "projection's input or to the KV cache at run time) needs a module in the forward "
                              "that stock transformers does not have, so the saved checkpoint would not reload "
                              "with AutoModelForCausalLM.from_pretrained. Only rotations fused into the weights are "
                              "supported: transform.online=false")

    def label(self) -> str:
        return f"rotation {self.matrix}" + (" +v" if self.rotate_v else "")


def _is_norm(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return not isinstance(mod, (nn.Linear, nn.Embedding)) and isinstance(w, torch.Tensor) and w.dim() == 1


@torch.no_grad()
def _norm_kind(norm: nn.Module, width: int):
    """``(offset, why_not)``: an RMSNorm computes ``x / rms(x) * (offset + weight)``; LayerNorm-like norms
    (mean subtracted, or a bias) are refused. Probed with the weight at zero and a mean-shifted input."""
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        return 0.0, "it has a bias (LayerNorm)"
    w = norm.weight
    saved = w.data.clone()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, width, generator=g, dtype=torch.float64) + 3.0).to(w.dtype)
    try:
        w.data.zero_()
        y0 = norm(x)
        offset = 0.0 if float(y0.abs().max()) == 0.0 else 1.0
        w.data.fill_(1.0 - offset)
        y = norm(x).double()
    finally:
        w.data.copy_(saved)
    xd = x.double()
    want = xd / xd.square().mean(-1, keepdim=True).add(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))).sqrt()
    if float((y - want).abs().max()) > 1e-3 * float(want.abs().max()):
        return offset, "it is not an RMSNorm (x / rms(x) * weight): a mean is subtracted or the input is rescaled"
    return offset, ""


CHUNK_BYTES = 64 * 2**20  # float64 working copy per chunk of rows rotated


def _rows_per_chunk(width: int) -> int:
    return max(1, CHUNK_BYTES // (8 * width))


@torch.no_grad()
def _right(w: torch.Tensor, q: torch.Tensor) -> int:
    """``w <- w Q`` in place (``w`` ``[rows, n]``, possibly a transposed view; ``Q`` ``[n, n]``, or ``[n]`` for
    a diagonal: the columns scaled), in float64, a chunk of rows at a time: the working set is one chunk, not
    float64 copies of the whole matrix (the head or embeddings of a 128k-token vocabulary at width 8192 would
    take 8 GiB each). Returns the rows per chunk."""
    step = _rows_per_chunk(w.shape[1])
    for a in range(0, w.shape[0], step):
        part = w[a:a + step]
        part.copy_((part.double() @ q if q.dim() == 2 else part.double() * q).to(w.dtype))
    return step


@register("transform", "rotation", RotationConfig)
class Rotation:
    """An orthogonal (randomized Hadamard) rotation of the residual stream fused into the weights, norms folded first; the float model is unchanged (QuaRot / SpinQuant-style, fixed)"""

    name = "rotation"
    needs_calibration = False
    whole_model = True  # transforms the model at once in prepare(): the model must be in memory

    def __init__(self, cfg: RotationConfig, spec=None, act=None):
        self.cfg = cfg

    def transform_block(self, bidx, block, inputs, linears) -> Dict:
        return {}

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> Dict:
        structure = block_structure(model)  # refuses unknown block layouts by name
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if emb is None or head is None or not isinstance(head, nn.Linear):
            raise UnsupportedModelError(f"rotation: {type(model).__name__} has no input embedding / linear head")
        roles = [(b.index, r, m) for b in structure.blocks for r, m in b.modules.items()]
        sparse = [f"block {i} {r}" for i, r, m in roles if float((m.weight == 0).float().mean()) > 0.01]
        if sparse:
            raise UnsupportedModelError(f"rotation: {sparse[:4]} are pruned (more than 1% exact zeros); a rotation "
                                        "makes every weight dense and would undo it. Rotate before pruning is not "
                                        "supported either: use transform=smoothquant or awq with a pruned model")
        dev = emb.weight.device
        probe = torch.randint(0, emb.weight.shape[0], (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
        ref = model(probe, use_cache=False).logits.double()

        readers = self._trace(model, probe, head)
        hidden = emb.weight.shape[1]
        # 1. untie the head from the embeddings (the head will carry the final norm's weight; first, so that
        # folding it into the head does not scale the embeddings too)
        untied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
        if untied:
            head.weight = nn.Parameter(emb.weight.detach().clone())
            for c in {id(model.config): model.config, id(text_config(model)): text_config(model)}.values():
                c.tie_word_embeddings = False
        # 2. fold every residual norm into its readers
        folded = []
        for norm, (nname, consumers) in readers.items():
            offset, why = _norm_kind(norm, hidden)
            if why:
                raise UnsupportedModelError(f"rotation: the norm {nname} ({type(norm).__name__}) cannot be folded: {why}")
            g = (offset + norm.weight.double())
            for mod in consumers:
                _right(mod.weight.data, g)
            norm.weight.data.fill_(1.0 - offset)
            folded.append(nname)
        # 3. rotate: embeddings, readers, writers
        q, how = rotation(hidden, self.cfg.seed, self.cfg.matrix)
        q = q.to(dev)

        emb_rows = _right(emb.weight.data, q)
        reader_mods = list(dict.fromkeys(m for _, cs in readers.values() for m in cs))
        for mod in reader_mods:
            _right(mod.weight.data, q)
        writers = [m for b in structure.blocks for m in dict.fromkeys((b.modules["o"], b.modules["down"]))]
        for mod in writers:
            _right(mod.weight.data.t(), q)  # Q^T W = (W^T Q)^T, in place through the transposed view
            if mod.bias is not None:
                mod.bias.data.copy_((mod.bias.double() @ q).to(mod.bias.dtype))
        # 4. values and attention output, per head
        v_how = None
        if self.cfg.rotate_v:
            v_how = self._rotate_v(structure)
        got = model(probe, use_cache=False).logits.double()
        rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        tol = 1e-4 if emb.weight.dtype in (torch.float32, torch.float64) else 20 * torch.finfo(emb.weight.dtype).eps
        if rel > tol:
            raise UnsupportedModelError(f"rotation: the rotated model's logits differ from the original's by {rel:.2e} "
                                        f"(relative, more than {tol:g}): something writes to or reads the residual "
                                        "stream outside the roles the map knows")
        return {"rotation": how, "size": hidden, "seed": self.cfg.seed, "norms_folded": len(folded), "chunk_rows": emb_rows,
                "readers": len(reader_mods), "writers": len(writers), "untied_head": untied,
                "added_params": int(head.weight.numel()) if untied else 0, "rotate_v": v_how,
                "logits_rel_diff": rel}

    @staticmethod
    def plan_bytes(model: nn.Module) -> Dict[str, float]:
        """What :meth:`prepare` adds to a model (built on the meta device) and its transient working set, in
        bytes, for ``compress plan``: the untied head (when the embeddings are tied) stays; the orthogonal
        matrix (float64) and one chunk of rows rotated in float64 (:func:`_right`) are transient."""
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings()
        vocab, hidden = emb.shape
        tied = head is not None and head.weight is emb
        size = torch.empty(0, dtype=emb.dtype).element_size()
        return {"added_bytes": float(vocab * hidden * size) if tied else 0.0,
                "working_bytes": float(hidden * hidden * 8 + 3 * min(vocab, _rows_per_chunk(hidden)) * hidden * 8)}

    def _trace(self, model, probe, head) -> Dict[nn.Module, tuple]:
        """Every norm of the residual-stream width and the linears that read its output (one forward; an
        input is a norm's output when it is that tensor or a view of all of it, e.g. the head's
        ``hidden[:, -k:]`` slice of every position: same storage start and size; the outputs are kept alive
        while tracing, so no storage is reused); a norm of that width whose output no linear reads directly
        is refused by name."""
        hidden = model.get_input_embeddings().weight.shape[1]
        names = {id(m): n for n, m in model.named_modules()}
        norms = [m for m in model.modules() if _is_norm(m) and m.weight.numel() == hidden]
        produced: Dict[tuple, nn.Module] = {}  # (storage start, numel) of a norm's output -> the norm
        consumed: Dict[nn.Module, List[nn.Module]] = {n: [] for n in norms}
        alive = []
        handles = []

        def post(m, args, out):
            if isinstance(out, torch.Tensor):
                produced[(out.data_ptr(), out.numel())] = m
                alive.append(out)

        def pre(m, args):
            src = produced.get((args[0].data_ptr(), args[0].numel()))
            if src is not None and m not in consumed[src]:
                consumed[src].append(m)

        for n in norms:
            handles.append(n.register_forward_hook(post))
        for m in model.modules():
            if isinstance(m, nn.Linear):
                handles.append(m.register_forward_pre_hook(pre))
        try:
            model(probe, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        orphan = [names[id(n)] for n, cs in consumed.items() if not cs]
        if orphan:
            raise UnsupportedModelError(f"rotation: the norms {orphan[:4]} act on the residual stream but no linear reads "
                                        "their output directly (post-norms on a branch's output, as in Gemma-2/3 and "
                                        "OLMo-2): their per-feature weight cannot be folded, so the rotation would change "
                                        f"the model. {type(model).__name__} is not supported by transform=rotation")
        if not any(head in cs for cs in consumed.values()):
            raise UnsupportedModelError("rotation: the head does not read a final norm's output directly")
        return {n: (names[id(n)], cs) for n, cs in consumed.items()}

    def _rotate_v(self, structure) -> str:
        d = structure.blocks[0].head_dim
        h = hadamard(d)
        if h is None:
            return f"skipped: no Hadamard of the head size {d}"
        hd = (h[0] / d ** 0.5)
        for b in structure.blocks:
            vmod, omod = b.modules["v"], b.modules["o"]
            a, _ = b.parts["v"]
            hv = hd.to(vmod.weight.device)
            for k in range(b.n_kv):
                rows = slice(a + k * d, a + (k + 1) * d)
                vmod.weight.data[rows] = (hv.t() @ vmod.weight.data[rows].double()).to(vmod.weight.dtype)
                if vmod.bias is not None:
                    vmod.bias.data[rows] = (vmod.bias.data[rows].double() @ hv).to(vmod.bias.dtype)
            for k in range(b.n_heads):
                cols = slice(k * d, (k + 1) * d)
                omod.weight.data[:, cols] = (omod.weight.data[:, cols].double() @ hv).to(omod.weight.dtype)
        return f"Hadamard {d} ({h[1]}) on every value head and o's head columns"

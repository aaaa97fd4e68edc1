"""Saving quantized models in formats that stock ``AutoModelForCausalLM.from_pretrained`` reloads.

* RTN and GPTQ: compressed-tensors ``pack-quantized`` (integer codes packed into int32, a float scale
  per row and group, packed zero points when asymmetric). transformers reloads it through its
  compressed-tensors integration, which needs the ``compressed-tensors`` package (the ``quant`` extra,
  pinned to 0.17.1: with transformers 5.24, 0.18-0.20 fail to reload *asymmetric* checkpoints, the packed
  zero points mismatching the shapes their own loader expects; symmetric ones work with all). The weights
  are decompressed on the first forward after loading; they then equal the in-memory quantized weights
  exactly, since both are ``(q - zero) * scale`` in float32.
* Sparsity is stored as explicit zeros: a pruned weight is exactly 0, which lies on the grid (code
  ``zero``), so nothing is lost. A sidecar ``compress_sparsity.json`` records the pattern and the zero
  count of every module, and what ideal 2:4 storage would cost, for the reload check.
* bitsandbytes: transformers' own 8-bit / 4-bit serialization (``save_pretrained``).

Only ``nn.Linear`` modules can be written in compressed-tensors format; a quantized ``Conv1D`` (GPT-2
style) is refused by name at save time (quantizing it in memory works).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from compress.core.config import parse_pattern
from compress.core.errors import UnsupportedModelError
from compress.core.activations import detach as detach_activations
from compress.core.grid import ActSpec, GridSpec
from compress.core.masks import check_nm

SIDECAR = "compress_sparsity.json"


def _require_compressed_tensors():
    if importlib.util.find_spec("compressed_tensors") is None:
        raise UnsupportedModelError(
            "saving an RTN/GPTQ model needs compressed-tensors (the format transformers reloads): "
            "pip install 'compress[quant]' (compressed-tensors==0.17.1)")


def quantization_args(spec: GridSpec):
    from compressed_tensors.quantization import QuantizationArgs

    if spec.group_size <= 0:
        return QuantizationArgs(num_bits=spec.bits, type=spec.type, symmetric=spec.symmetric, strategy=spec.strategy)
    return QuantizationArgs(num_bits=spec.bits, type=spec.type, symmetric=spec.symmetric, strategy="group",
                            group_size=spec.group_size)


def activation_args(act: ActSpec):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=act.bits, type=act.type, symmetric=True, strategy=act.strategy,
                            dynamic=bool(act.dynamic))


def storage_format(spec: GridSpec, act: Optional[ActSpec] = None) -> str:
    """The compressed-tensors format for the weights (the one compressed-tensors itself infers, which vLLM
    reads): FP8 values as ``float-quantized``; integers as ``int-quantized`` (int8 tensors) when 8-bit or
    when the activations are quantized too (W8A8, W4A8); weight-only integers below 8 bits packed into int32
    (``pack-quantized``)."""
    if spec.type == "float":
        return "float-quantized"
    return "int-quantized" if spec.bits == 8 or act is not None else "pack-quantized"


@torch.no_grad()
def save_compressed_tensors(model: nn.Module, out_dir, params: Dict[str, tuple], spec: GridSpec, tokenizer=None,
                            sidecar: Optional[Dict] = None, act: Optional[ActSpec] = None,
                            act_scales: Optional[Dict[str, torch.Tensor]] = None) -> Dict:
    """Write ``model`` (its quantized linears already hold the dequantized weights) as compressed-tensors
    (:func:`storage_format`) into ``out_dir``. ``params``: full module name -> ``(scale, zero)`` as returned
    by the quantizer (``[out, groups]``; ``zero`` None when symmetric; per tensor: ``[out, 1]`` equal
    values). ``act``: the 8-bit input activations, written as the scheme's ``input_activations`` (static:
    ``act_scales``, full name -> scale, as ``input_scale``). The model itself is not changed (a copy is
    compressed; the activation hooks are removed from the copy). Returns what was written."""
    _require_compressed_tensors()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    bad = [n for n in params if not isinstance(model.get_submodule(n), nn.Linear)]
    if bad:
        raise UnsupportedModelError(f"compressed-tensors stores nn.Linear only; these quantized modules are not: "
                                    f"{bad[:6]} ({type(model.get_submodule(bad[0])).__name__})")
    names = list(params)
    fmt = storage_format(spec, act)
    scheme = QuantizationScheme(targets=names, weights=quantization_args(spec),
                                input_activations=activation_args(act) if act is not None else None)
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt)
    clone = copy.deepcopy(model)
    detach_activations(clone)
    apply_quantization_config(clone, config)
    for name in names:
        mod = clone.get_submodule(name)
        scale, zero = params[name]
        if spec.per_tensor:
            scale = scale.reshape(-1)[:1]
            zero = None if zero is None else zero.reshape(-1)[:1]
        mod.weight_scale.copy_(scale.to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape))
        if zero is not None:
            mod.weight_zero_point.copy_(zero.round().to(mod.weight_zero_point.dtype).reshape(mod.weight_zero_point.shape))
        if act is not None and not act.dynamic:
            mod.input_scale.copy_(act_scales[name].to(mod.input_scale.dtype).reshape(mod.input_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(clone, quantization_format=fmt)
    compressor.compress_model(clone)
    out_dir = Path(out_dir)
    clone.save_pretrained(out_dir, safe_serialization=True)
    compressor.update_config(str(out_dir))
    del clone
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if sidecar is not None:
        (out_dir / SIDECAR).write_text(json.dumps(sidecar, indent=1))
    files = sorted(p.name for p in out_dir.iterdir())
    if any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files):
        raise RuntimeError(f"a pickle was written to {out_dir}: {files}")
    return {"format": f"compressed-tensors {fmt}", "path": str(out_dir), "modules": len(names),
            "input_activations": act.label() if act is not None else None,
            "bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.suffix == ".safetensors")}


def sparsity_sidecar(weights: Dict[str, torch.Tensor], pattern: Optional[str]) -> Dict:
    """Pattern and zero counts per module (``[out, in]`` weights), and what ideal 2:4 storage would cost
    (half the values plus 2 bits of metadata per kept value)."""
    nm = parse_pattern(pattern) if pattern else None
    mods = {}
    for name, w in weights.items():
        zeros = int(w.numel() - torch.count_nonzero(w))
        entry = {"zeros": zeros, "numel": w.numel()}
        if nm is not None:
            entry["nm_exact"] = check_nm(w, *nm)
        mods[name] = entry
    return {"pattern": pattern or "dense", "modules": mods,
            "zeros": sum(m["zeros"] for m in mods.values()), "numel": sum(m["numel"] for m in mods.values())}

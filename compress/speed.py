"""Real speed of a compressed model: 2:4 sparse tensor-core kernels and prefill throughput.

Masks alone make nothing faster: a zero in a dense matrix costs as much as any other value. This
module turns exactly-2:4 weights into torch's ``SparseSemiStructuredTensor`` (cuSPARSELt or CUTLASS
kernels on NVIDIA GPUs from Ampere on, fp16/bf16) so that the speed-up can be *measured*, and gives
one throughput measurement used by the benchmarks and the ``eval.speed`` switch.

On CPU there is no 2:4 kernel: :func:`to_semi_structured` raises, and :func:`prefill_throughput`
measures the dense kernels (the honest CPU figure for a pruned model is the dense one).

:func:`serving_speed` measures several models interleaved in one process the way a server runs them:
prefill with last-position logits at several batch sizes, and greedy decoding with a KV cache (used for
structured pruning, whose smaller shapes are faster on any kernel).
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch
from torch import nn

from compress.core.masks import check_nm


@torch.no_grad()
def dense_forward_seconds(model: nn.Module, ids: torch.Tensor, batch_size: int = 1) -> float:
    """The yardstick every time is divided by: one forward of the model over ``ids`` (e.g. the calibration
    tokens), in batches of ``batch_size``, no KV cache."""
    dev = next(model.parameters()).device
    t = time.perf_counter()
    for i in range(0, ids.shape[0], batch_size):
        model(input_ids=ids[i:i + batch_size].to(dev), use_cache=False)
    return time.perf_counter() - t


def semi_structured_available(device=None) -> bool:
    """2:4 kernels need CUDA with compute capability >= 8.0."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False
    return torch.cuda.get_device_capability(dev)[0] >= 8


def to_semi_structured(model: nn.Module, backend: str = "auto") -> List[str]:
    """Swap the weight of every exactly-2:4 ``nn.Linear`` for a ``SparseSemiStructuredTensor``.

    Inference only (the weights become frozen). The model must be on a CUDA device in fp16 or bf16.
    ``backend``: ``auto`` (cuSPARSELt where torch has it, else CUTLASS), ``cutlass`` or ``cusparselt``.
    Returns the names of the converted modules; linears that are not exactly 2:4 stay dense.
    """
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend not in ("auto", "cutlass", "cusparselt"):
        raise ValueError(f"backend={backend!r} is not valid. Valid choices: auto, cutlass, cusparselt")
    params = list(model.parameters())
    if not params or not semi_structured_available(params[0].device):
        raise RuntimeError("2:4 semi-structured kernels need an NVIDIA GPU with compute capability >= 8.0; "
                           "on this device a 2:4 model runs on the dense kernels")
    if params[0].dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"2:4 kernels need fp16 or bf16 weights, the model is {params[0].dtype}")
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    converted = []
    seen = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or id(mod.weight) in seen:
            continue
        seen.add(id(mod.weight))
        w = mod.weight.detach()
        if w.shape[1] % 4 or not check_nm(w, 2, 4):
            continue
        mod.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        converted.append(name)
    return converted


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_throughput(model: nn.Module, batch_size: int = 8, seqlen: int = 512, iters: int = 10, warmup: int = 3,
                       vocab_size: int | None = None, seed: int = 0) -> Dict:
    """Tokens/s of a full forward (prefill, no KV cache) on random token ids, median over ``iters``."""
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seqlen), generator=g).to(device)
    was_training = model.training
    model.eval()
    for _ in range(warmup):
        model(input_ids=ids, use_cache=False)
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        times.append(time.perf_counter() - t0)
    model.train(was_training)
    times.sort()
    med = times[len(times) // 2]
    return {"tokens_per_s": batch_size * seqlen / med, "ms_per_batch": med * 1e3, "batch_size": batch_size,
            "seqlen": seqlen, "iters": iters, "device": str(device), "dtype": str(next(model.parameters()).dtype)}


@torch.no_grad()
def _prefill_once(model, ids) -> float:
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)  # last-position logits, as a serving engine
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def _decode_once(model, prompt, new_tokens: int) -> float:
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    _sync(device)
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"decode produced {out.shape[1] - prompt.shape[1]} tokens, expected {new_tokens}")
    return time.perf_counter() - t0


@torch.no_grad()
def serving_speed(models: Dict[str, nn.Module], batch_sizes=(1, 8), seqlen: int = 512, new_tokens: int = 128,
                  prompt_len: int = 32, rounds: int = 5, warmup: int = 1, seed: int = 0) -> Dict:
    """Prefill tokens/s (last-position logits) at each batch size and decode tokens/s (batch 1, KV cache,
    ``new_tokens`` greedy tokens after a ``prompt_len`` prompt) of several models, measured interleaved in
    this process (round by round, each model in turn) so that they share the machine's state; medians.
    Every parameter is first copied into fresh memory (values unchanged), so that no model runs on pages
    mapped from its checkpoint while another runs on allocated ones. Ratios are to the first model."""
    names = list(models)
    for m in models.values():  # every weight in fresh memory: a model read from safetensors may still map the file,
        for p in m.parameters():  # and mapped pages time differently from allocated ones (tied weights: once)
            p.data = p.data.clone()
    m0 = models[names[0]]
    device = next(m0.parameters()).device
    vocab = m0.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = {b: torch.randint(0, vocab, (b, seqlen), generator=g).to(device) for b in batch_sizes}
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)
    for m in models.values():
        m.eval()
        for b in batch_sizes:
            for _ in range(warmup):
                _prefill_once(m, ids[b])
        _decode_once(m, prompt, min(8, new_tokens))
    times = {n: {f"prefill_b{b}": [] for b in batch_sizes} | {"decode_b1": []} for n in names}
    for _ in range(rounds):
        for n in names:
            for b in batch_sizes:
                times[n][f"prefill_b{b}"].append(_prefill_once(models[n], ids[b]))
            times[n]["decode_b1"].append(_decode_once(models[n], prompt, new_tokens))
    out = {"device": str(device), "dtype": str(next(m0.parameters()).dtype), "seqlen": seqlen, "rounds": rounds,
           "new_tokens": new_tokens, "prompt_len": prompt_len, "batch_sizes": list(batch_sizes), "models": {}}
    for n in names:
        r = {}
        for key, ts in times[n].items():
            med = sorted(ts)[len(ts) // 2]
            if key.startswith("prefill"):
                b = int(key.split("_b")[1])
                r[key + "_tokens_per_s"] = b * seqlen / med
            else:
                r[key + "_tokens_per_s"] = new_tokens / med
            r[key + "_s"] = med
        out["models"][n] = r
    base = out["models"][names[0]]
    for n in names[1:]:
        out["models"][n]["speedup"] = {k.replace("_tokens_per_s", ""): v / base[k] for k, v in out["models"][n].items()
                                       if k.endswith("_tokens_per_s")}
    return out

"""Text sources, tokenization and the calibration sampler.

Embedded (offline) data: WikiText-2, shipped in ``compress/data/wikitext-2/`` under CC BY-SA 3.0 (see
the README there). ``wiki.test.raw`` is the evaluation text and ``wiki.valid.tokens`` the calibration
and training text, so calibration never sees evaluation text.

Online sources (``wikitext2_hub``, ``c4``) go through ``datasets``; without network they fail at once
with a clear message instead of hanging. Any local ``.txt``, ``.jsonl`` or ``.parquet`` path works too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Optional

from compress.core.runtime import cache_dir

DATA_DIR = Path(__file__).resolve().parent / "wikitext-2"
EMBEDDED = {
    # name -> (file for eval, file for calibration/training)
    "wikitext2": ("wiki.test.raw", "wiki.valid.tokens"),
}
ONLINE = ("wikitext2_hub", "c4")
JOIN_RULE = "file text as one string, CRLF normalised to LF"


class DataUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Text:
    """A text source resolved to one string, with what is needed to record its provenance."""

    name: str
    split: str
    text: str
    origin: str
    join_rule: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_local(path: Path, text_field: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw", ".tokens", ".text", ""):
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    if text_field not in row:
                        raise DataUnavailable(f"{path}:{i + 1} has no field {text_field!r} (set calib.text_field)")
                    rows.append(row[text_field])
        return "\n\n".join(rows)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[text_field])
        return "\n\n".join(str(t) for t in table.column(text_field).to_pylist())
    raise DataUnavailable(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .parquet")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_online(name: str, role: str, text_field: str) -> Text:
    if not _hub_reachable():
        raise DataUnavailable(
            f"data source {name!r} needs the Hugging Face Hub, which cannot be reached (offline or HF_*_OFFLINE=1). "
            "Use the embedded 'wikitext2' or a local .txt/.jsonl/.parquet path instead."
        )
    from datasets import load_dataset

    if name == "wikitext2_hub":
        split = "test" if role == "eval" else "train"
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return Text(name, split, "\n\n".join(ds["text"]), "hub:wikitext/wikitext-2-raw-v1", "'\\n\\n'.join(rows)")
    if name == "c4":
        split = "validation" if role == "eval" else "train"
        shard = "en/c4-validation.00000-of-00008.json.gz" if role == "eval" else "en/c4-train.00000-of-01024.json.gz"
        ds = load_dataset("allenai/c4", data_files={split: shard}, split=split)
        rows = ds[text_field][:1100] if role == "eval" else ds[text_field][:20000]
        return Text(name, split, " ".join(rows), f"hub:allenai/c4/{shard}", "' '.join(first rows)")
    raise DataUnavailable(f"unknown online source {name!r}")


def load_text(source: str, role: str = "calib", text_field: str = "text") -> Text:
    """Resolve ``source`` to text. ``role`` is ``eval`` (held-out text) or ``calib``/``train``."""
    if source in EMBEDDED:
        fname = EMBEDDED[source][0 if role == "eval" else 1]
        path = DATA_DIR / fname
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        split = "test" if role == "eval" else "validation"
        return Text(source, split, text, f"embedded:{fname}", JOIN_RULE)
    if source in ONLINE:
        return _load_online(source, role, text_field)
    path = Path(source).expanduser()
    if path.exists():
        return Text(path.stem, "file", _read_local(path, text_field), str(path.resolve()), JOIN_RULE)
    raise DataUnavailable(
        f"data source {source!r} is neither a known dataset ({', '.join(list(EMBEDDED) + list(ONLINE))}) "
        "nor an existing file")


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ident = backend.to_str() if backend is not None else f"{getattr(tokenizer, 'name_or_path', '')}:{getattr(tokenizer, 'vocab_size', '')}:{type(tokenizer).__name__}"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]


@lru_cache(maxsize=8)
def _tokenize_cached(fingerprint: str, text_hash: str, text: str, tokenizer) -> "object":
    """Token ids, cached per process and on disk (safetensors) so that sweep cells share them."""
    import torch

    disk = None
    try:
        from safetensors.torch import load_file, save_file

        disk = cache_dir() / "tokens" / f"{fingerprint}-{text_hash[:16]}.safetensors"
        if disk.exists():
            return load_file(disk)["ids"]
    except Exception:  # a broken cache is only a cache
        disk = None
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"],
                       dtype=torch.long)
    if disk is not None:
        try:
            disk.parent.mkdir(parents=True, exist_ok=True)
            tmp = disk.with_suffix(f".{os.getpid()}.tmp")
            save_file({"ids": ids}, tmp)
            os.replace(tmp, disk)
        except OSError:
            pass
    return ids


def tokenize(tokenizer, text: Text):
    """Token ids of the whole text as one string, no special tokens (cached in process and on disk)."""
    import transformers.utils.logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than model max length"
    try:
        return _tokenize_cached(_tokenizer_fingerprint(tokenizer), text.sha256, text.text, tokenizer)
    finally:
        hf_logging.set_verbosity(verbosity)


def sample_starts(ntokens: int, nsamples: int, seqlen: int, seed: int) -> List[int]:
    """The reference sampling rule: ``random.seed(seed)``, then ``randint(0, ntokens - seqlen - 1)`` per sample.

    A private ``random.Random`` gives the same sequence without touching global state.
    """
    if ntokens - seqlen - 1 < 0:
        raise DataUnavailable(f"calibration text has {ntokens} tokens, too few for windows of {seqlen}")
    rng = random.Random(seed)
    return [rng.randint(0, ntokens - seqlen - 1) for _ in range(nsamples)]


def calibration_windows(ids, nsamples: int, seqlen: int, seed: int):
    """``[nsamples, seqlen]`` LongTensor of windows drawn with :func:`sample_starts`."""
    import torch

    starts = sample_starts(int(ids.numel()), nsamples, seqlen, seed)
    return torch.stack([ids[i:i + seqlen] for i in starts])


def load_calibration(tokenizer, source: str = "wikitext2", nsamples: int = 32, seqlen: int = 512, seed: int = 0,
                     text_field: str = "text"):
    """Calibration windows plus their provenance record."""
    text = load_text(source, role="calib", text_field=text_field)
    ids = tokenize(tokenizer, text)
    windows = calibration_windows(ids, nsamples, seqlen, seed)
    info = {"dataset": text.name, "split": text.split, "origin": text.origin, "sha256": text.sha256,
            "join_rule": text.join_rule, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "sampling": "random.seed(seed); randint(0, ntokens - seqlen - 1) per sample",
            "ntokens_text": int(ids.numel()),
            "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
    return windows, info


def packed_sequences(tokenizer, source: str, seqlen: int, text_field: str = "text", max_sequences: Optional[int] = None):
    """Training text packed into consecutive non-overlapping sequences of ``seqlen`` tokens."""
    text = load_text(source, role="train", text_field=text_field)
    if source in EMBEDDED and text.split == "test":  # never train on eval text
        raise DataUnavailable("refusing to train on the evaluation split")
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seqlen
    if max_sequences:
        n = min(n, max_sequences)
    return ids[: n * seqlen].view(n, seqlen), {"dataset": text.name, "split": text.split, "sha256": text.sha256,
                                               "seqlen": seqlen, "sequences": n}

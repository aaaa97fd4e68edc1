"""Shared fixtures: tiny random-config models of several families, and the real embedded model.

No test touches the network: the hub is switched off for the whole session.
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from compress.models import byte_tokenizer  # noqa: F401  (the tests import it from here)

VOCAB = 128


def _tiny(family: str, seed: int = 0, vocab: int = VOCAB, layers: int = 0):
    """A tiny random model of ``family``. The per-layer-attention families (``gemma2``, ``gemma3``,
    ``qwen2_sliding``, ``cohere2``) have 4 blocks and a sliding window of 8 tokens, shorter than the test
    sequences, so that sliding and full attention layers really get different masks."""
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    gqa = dict(common, intermediate_size=128, num_key_value_heads=2)
    sliding = dict(gqa, num_hidden_layers=4, sliding_window=8)
    if family == "llama":  # GQA, tied embeddings like the default model
        cfg = T.LlamaConfig(**gqa, tie_word_embeddings=True)
    elif family == "mistral":
        cfg = T.MistralConfig(**gqa)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**gqa)
    elif family == "opt":
        cfg = T.OPTConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                          max_position_embeddings=256, word_embed_proj_dim=64)
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(**common, intermediate_size=128)
    elif family == "gpt2":  # Conv1D linears (transposed weights), fused c_attn
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                           eos_token_id=2)
    elif family == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = T.Phi3Config(**gqa, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif family == "gemma2":  # sliding / full attention alternating
        cfg = T.Gemma2Config(**sliding, head_dim=16)
    elif family == "gemma3":  # 3 sliding then 1 full, local and global rotary embeddings
        cfg = T.Gemma3TextConfig(**sliding, head_dim=16, sliding_window_pattern=4,
                                 layer_types=["sliding_attention"] * 3 + ["full_attention"])
    elif family == "qwen2_sliding":  # full attention in the first 2 blocks, sliding after
        cfg = T.Qwen2Config(**sliding, use_sliding_window=True, max_window_layers=2)
    elif family == "cohere2":
        cfg = T.Cohere2Config(**sliding, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(family)
    if layers:
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = (cfg.layer_types * layers)[:layers]
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt_neox"]
# every family whose replay and pruning is tested (PER_LAYER: with per-layer attention types)
PER_LAYER = ["gemma2", "gemma3", "qwen2_sliding", "cohere2"]
ALL_FAMILIES = FAMILIES + ["gpt2", "phi3"] + PER_LAYER


def reload_check_cli(run, cwd=None, ok_codes=(0,)):
    """``compress reload-check RUN`` in a fresh process (which imports only torch and transformers to reload the
    saved model); its exit status must be one of ``ok_codes``; returns ``reload_check.json``."""
    p = subprocess.run([sys.executable, "-m", "compress", "reload-check", str(run)], capture_output=True, text=True,
                       timeout=600, cwd=cwd or run)
    assert p.returncode in ok_codes, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads((run / "reload_check.json").read_text())


def save_tiny(family: str, path, seed: int = 0, layers: int = 0):
    """Save a tiny random ``family`` model with a byte tokenizer to ``path`` (a stock HF checkpoint)."""
    model = _tiny(family, seed=seed, vocab=260, layers=layers)
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_model():
    return _tiny


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (8, 32), generator=g)


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M (converted once into the user cache)."""
    from compress.config import ModelConfig
    from compress.models import load_model

    return load_model(ModelConfig(device="cpu"))

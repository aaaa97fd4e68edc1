"""Shared fixtures: tiny random-config models of several families, and the real embedded model.

No test touches the network: the hub is switched off for the whole session.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

VOCAB = 128


def _tiny(family: str, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "llama":  # GQA, tied embeddings like the default model
        cfg = T.LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True)
    elif family == "mistral":
        cfg = T.MistralConfig(**common, intermediate_size=128, num_key_value_heads=2)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2)
    elif family == "opt":
        cfg = T.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                          max_position_embeddings=256, word_embed_proj_dim=64)
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(**common, intermediate_size=128)
    else:
        raise ValueError(family)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt_neox"]


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

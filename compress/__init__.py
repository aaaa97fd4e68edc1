"""compress: an LLM compression research harness (pruning, quantization, recovery) on Hugging Face models.

Public API (imports are lazy so that the CLI starts fast)::

    from compress import load_model, make_config, perplexity, prune_model, quantize_model, run_experiment
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": "compress.models",
    "perplexity": "compress.evaluate",
    "size_metrics": "compress.evaluate",
    "prune_model": "compress.stages.prune",
    "quantize_model": "compress.stages.quant",
    "make_config": "compress.config",
    "run_experiment": "compress.experiment",
    "find_blocks": "compress.calibration.blocks",
    "load_calibration": "compress.data",
    "Config": "compress.config",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]

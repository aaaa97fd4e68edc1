"""GPU machine side, usage: python benchmarks/gpu/random_model.py DIR_WITH_CONFIG_AND_TOKENIZER

The default model's exact architecture and tokenizer with random weights (seed 0).

The GGUF (98 MB) cannot travel to the GPU machine (64 MiB limit), so GPU figures use random weights:
memory and speed do not depend on the values; perplexities from this model are meaningless."""
import os, shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src = Path(sys.argv[1])  # a directory with the config.json and tokenizer files of the default model
dst = Path(os.environ["COMPRESS_CACHE"]) / "models" / "smollm2-135m-instruct"
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    shutil.copy(f, dst / f.name)
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained(src)
m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
m.save_pretrained(dst, safe_serialization=True)
(dst / "SOURCE.txt").write_text("RANDOM WEIGHTS (seed 0), SmolLM2-135M architecture, for GPU memory/speed only\n")
print("random model at", dst, sum(p.numel() for p in m.parameters()))

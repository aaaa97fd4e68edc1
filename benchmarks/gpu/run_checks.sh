#!/usr/bin/env bash
# The GPU checks of BENCHMARKS.md as one script (run from the repo root on the GPU machine, OUT set).
# That machine had no network and no copy of the embedded model, so .gpu/ (git-ignored) carried wheels
# of the packages missing there (transformers 5.24, peft) in .gpu/whl, unpacked ones (bitsandbytes,
# hydra, omegaconf, antlr4, greenlet) in .gpu/site, and the model's config + tokenizer files in .gpu/model.
set -u
T0=$(date +%s)
step() { echo; echo "=== $1 (t=$(( $(date +%s) - T0 ))s)"; }
export PYTHONUNBUFFERED=1 COMPRESS_CACHE=/tmp/ccache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step install
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, accelerate, bitsandbytes, hydra; print('torch', torch.__version__, torch.version.cuda, 'tf', transformers.__version__, 'peft', peft.__version__, 'acc', accelerate.__version__, 'bnb', bitsandbytes.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" || exit 1
python3 benchmarks/gpu/random_model.py .gpu/model || exit 1
step sparse_speed
timeout 150 python3 benchmarks/sparse_speed.py --out $OUT/sparse_speed.json
step train_memory
timeout 200 python3 benchmarks/train_memory.py --device cuda --steps 5 --out $OUT/train_memory_cuda.json
step cli_bf16
timeout 90 python3 -m compress prune=sparsegpt prune.pattern=2:4 model.dtype=bfloat16 train=lora train.precision=bf16 train.max_steps=5 eval.max_windows=8 hydra.run.dir=/tmp/cli_run && cp /tmp/cli_run/results.json $OUT/cli_bf16_results.json
step prune_bench
timeout 120 python3 benchmarks/prune_bench.py --device cuda --dtype float32 --modes seq,ref --only wanda_50,sparsegpt_50,sparsegpt_2of4 --out $OUT/prune_cuda.json
step done

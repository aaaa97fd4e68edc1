"""CUDA paths of structured pruning on a tiny random Qwen2 (q/k/v biases, GQA): the LoRA estimator trains
in the shared trainer on the GPU, masks on its schedule, and the physical removal on CUDA tensors gives the
masked model's logits; depth removal keeps KV-cache generation equal to cache-free greedy decoding."""

import json
import sys

import torch
import transformers as T

from compress.calibration.blocks import find_blocks
from compress.calibration.roles import block_structure
from compress.schema import TrainConfig
from compress.structured.lora import LoraPruneCallback
from compress.structured.surgery import block_params, masked_logits, plan_widths, remove_blocks, remove_width
from compress.training import Trainer

dev = "cuda"
torch.manual_seed(0)
cfg = T.Qwen2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, max_position_embeddings=256)
model = T.AutoModelForCausalLM.from_config(cfg).to(dev).eval()
st = block_structure(model)
plan = plan_widths(st.blocks[0], block_params(find_blocks(model)[1][0]), 0.3, "kv_group", None, 8)
cb = LoraPruneCallback(st, plan, total_steps=8, warmup=0.25, cooldown=0.25, round_to=8)
tc = TrainConfig(method="lora", max_steps=8, micro_batch_size=2, seqlen=16, lr=1e-3, lora_r=4, log_every=4, eval_before=False)
ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
merged = Trainer(model, tc, ids, masks={}, device=dev, callbacks=[cb]).fit()
cb.detach()
keeps = cb.keeps()
x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)).to(dev)
masked = masked_logits(merged, st, keeps, x)
remove_width(merged, st, keeps)
with torch.no_grad():
    diff = float((merged(input_ids=x).logits - masked).abs().max())
remove_blocks(merged, [0])
with torch.no_grad():
    p = x[:1, :8]
    cached = merged.generate(input_ids=p, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True)
    seq = p
    for _ in range(12):
        seq = torch.cat([seq, merged(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
out = {"device": torch.cuda.get_device_name(), "masked_vs_physical_max_abs": diff, "schedule": cb.history,
       "kv_kept": [k.kv_heads for k in keeps], "channels_kept": [len(k.channels) for k in keeps],
       "depth_generate_equal": bool(torch.equal(cached, seq)), "param_device": str(next(merged.parameters()).device)}
print(json.dumps(out))
sys.exit(0 if diff <= 1e-5 and out["depth_generate_equal"] else 1)

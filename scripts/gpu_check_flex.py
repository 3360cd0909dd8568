"""GPU check: packed loss and gradients with FlexAttention + tree BlockMask equal the dense 4D mask's.

    python scripts/gpu_check_flex.py        (needs torch, transformers, pydantic and this repository)
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout_imports import use_checkout  # noqa: E402

use_checkout()

from gpu_check_training import loss_and_grads, rel_diff, tree_grpo_trees  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from arborl.components.config import TrainConfig  # noqa: E402
from arborl.components.training.packing import build_units  # noqa: E402


def main() -> None:
    cfg = TrainConfig(grad_clip=1e9, max_tokens_per_microbatch=4096)
    conf = LlamaConfig(vocab_size=200, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=512, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf).cuda()
    units = build_units(*tree_grpo_trees(8, 200, seed=2))
    dense, g_dense = loss_and_grads(model, units, "packed", cfg, 0)
    flex_model = copy.deepcopy(model)
    flex_model.set_attn_implementation("flex_attention")
    flex, g_flex = loss_and_grads(flex_model, units, "packed", cfg, 0)
    result = {"flex_vs_dense_max_rel_grad_diff": rel_diff(g_flex, g_dense),
              "flex_vs_dense_loss_diff_over_scale": abs(flex["loss"] - dense["loss"]) / dense["loss_scale"]}
    print(json.dumps(result))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_flex.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

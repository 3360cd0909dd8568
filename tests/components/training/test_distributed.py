"""components.training.distributed: sharding, launch checks, precision options, and 2 gloo ranks on CPU.

The two-rank test starts a real `torch.distributed.run` job (gloo, 2 processes) with a hard timeout.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from arborl.components.config import TrainConfig
from arborl.components.training import distributed
from arborl.components.training.distributed import Dist
from arborl.components.training.packing import build_units
from arborl.components.training.trainer import policy_update

ROOT = Path(__file__).resolve().parents[3]


def test_shards_cover_every_item_once_in_a_fixed_way():
    items = list(range(11))
    shards = [distributed.shard(items, Dist(rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == items
    assert shards[1] == [1, 4, 7, 10]
    assert distributed.shard(items, Dist()) == items


def test_plain_process_is_a_single_rank(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    d = distributed.init("ddp", "cpu")
    assert d == Dist() and d.is_main and not d.active
    assert distributed.all_reduce_sum(3.5, d) == 3.5 and distributed.padded_count(4, d) == 4
    assert distributed.loss_scale(d) == 1.0


@pytest.mark.parametrize(("mode", "device", "message"), [("none", "cpu", "WORLD_SIZE=2"), ("fsdp", "cpu", "cuda")])
def test_launch_and_config_disagreeing_is_an_error(monkeypatch, mode, device, message):
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=message):
        distributed.init(mode, device)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    ids = torch.randint(4, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def grads(model):
        model.train()
        model.zero_grad()
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(tiny_model)
    distributed.enable_gradient_checkpointing(tiny_model)
    assert tiny_model.is_activation_checkpointing
    for a, b in zip(plain, grads(tiny_model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_switches_the_compute_dtype():
    x = torch.randn(4, 4)
    with distributed.autocast(True, "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with distributed.autocast(False, "cpu"):
        assert (x @ x).dtype == torch.float32


SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from arborl.components.training import distributed

    torch.set_num_threads(1)
    d = distributed.init("ddp", "cpu")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, pad_token_id=0))
    g = torch.Generator().manual_seed(1)
    # 5 sequences of different lengths, weights per token; 5 micro-batches of 1 -> ranks get 3 and 2
    seqs = [(torch.randint(1, 40, (1, n), generator=g), torch.randn(1, n - 1, generator=g)) for n in (5, 9, 3, 7, 6)]
    normaliser = sum(w.numel() for _, w in seqs)  # the whole batch's token count, the same on every rank
    model = distributed.wrap(model, d)
    mine = distributed.shard(seqs, d)
    runs = distributed.padded_count(len(mine), d)
    for i in range(runs):
        with distributed.sync_context(model, last=i == runs - 1):
            if i < len(mine):
                ids, w = mine[i]
                logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
                logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
                ((logp * w).sum() / normaliser * distributed.loss_scale(d)).backward()
            else:
                distributed.zero_backward(model, 0, "cpu")
    grads = {n: p.grad.tolist() for n, p in distributed.unwrap(model).named_parameters()}
    if d.is_main:
        json.dump({"world": d.world_size, "grads": grads}, open(sys.argv[1], "w"))
    distributed.shutdown(d)
''')


@pytest.mark.slow  # starts processes
def test_two_gloo_ranks_sum_to_the_single_process_gradient(tmp_path):
    script = tmp_path / "grad_sum.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], env=env, check=True, timeout=120)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path / "two.json")]
    # gloo on a loaded 2-core machine was seen (once in many runs) to abort a rank at exit ("terminate called
    # without an active exception"); a second launch tells that apart from a real failure, which repeats
    for _ in range(2):
        done = subprocess.run(command, env=env, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (one["world"], two["world"]) == (1, 2)
    for name, g in one["grads"].items():
        torch.testing.assert_close(torch.tensor(two["grads"][name]), torch.tensor(g), atol=1e-7, rtol=1e-5)
    assert any(torch.tensor(g).abs().max() > 1e-4 for g in one["grads"].values())


def _random_trees(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts, nodes, adv = {}, [], {}
    for p in range(2):
        pid = f"q{p}"
        prompts[pid] = [1] + [rng.randrange(4, vocab) for _ in range(5)]
        for node, parent in ((0, None), (1, 0), (2, 0), (3, 2)):
            mask = [True] * 4 + [False] * 3
            nodes.append({"prompt_id": pid, "tree_id": 0, "node_id": node, "parent_id": parent,
                          "token_ids": [rng.randrange(4, vocab) for _ in mask], "loss_mask": mask,
                          "logprobs": [-1.0 if m else float("nan") for m in mask]})
        adv[(pid, 0, 1)], adv[(pid, 0, 3)] = rng.uniform(-1, 1), rng.uniform(-1, 1)
    return build_units(prompts, nodes, adv)


def _policy_grads(model, cfg) -> torch.Tensor:
    policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), _random_trees(model.config.vocab_size), cfg,
                  0, seed=0)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_bf16_and_checkpointing_options_in_a_policy_step(tiny_model):
    plain = _policy_grads(copy.deepcopy(tiny_model), TrainConfig(grad_clip=1e9))
    bf16 = _policy_grads(copy.deepcopy(tiny_model), TrainConfig(grad_clip=1e9, bf16=True))
    assert not torch.equal(bf16, plain)  # autocast really ran in bfloat16 ...
    assert torch.nn.functional.cosine_similarity(bf16, plain, dim=0) > 0.999  # ... and the step barely moved
    checkpointed = copy.deepcopy(tiny_model)
    distributed.enable_gradient_checkpointing(checkpointed)
    torch.testing.assert_close(_policy_grads(checkpointed, TrainConfig(grad_clip=1e9)), plain, atol=1e-7, rtol=1e-5)

"""components.sampling.vllm_backend: the vLLM engine behind the HF backend's contract.

vLLM cannot be installed next to this project's orchestration stack (and needs a GPU in practice), so the
end-to-end test runs only where `vllm` is importable — the `sampler` image — and is skipped otherwise.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from arborl.components.config import AgentConfig, SamplingConfig
from arborl.components.sampling.agent import SearchEnv
from arborl.components.sampling.scheduler import sample_trees
from arborl.components.training.models import prompt_ids, save_policy


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_missing_vllm_is_a_clear_error(tmp_path, policy, tokenizer):
    from arborl.components.sampling.vllm_backend import VLLMBackend

    save_policy(policy, tokenizer, str(tmp_path / "model"))
    with pytest.raises(ImportError, match=r"vllm.*extra.*sampler"):
        VLLMBackend.from_model_dir(str(tmp_path / "model"))


def test_vllm_backend_grows_trees_with_the_policys_logprobs(tmp_path, policy, tokenizer, retriever, questions):
    pytest.importorskip("vllm")
    from arborl.components.sampling.vllm_backend import VLLMBackend

    save_policy(policy, tokenizer, str(tmp_path / "model"))
    backend, tok = VLLMBackend.from_model_dir(str(tmp_path / "model"), dtype="float32", gpu_memory_utilization=0.3)
    agent = AgentConfig(max_turns=4, max_tokens_per_turn=12, max_total_tokens=200)
    prompts = [(q["prompt_id"], prompt_ids(tok, q["prompt"])) for q in questions["train"][:4]]
    trees = sample_trees(backend, SearchEnv(retriever, tok), prompts, SamplingConfig(), agent, seed=0)
    assert all(len(t.leaves()) == 3 for t in trees)
    for tree in trees:
        for node in tree.nodes:
            parent = -1 if node.parent_id is None else node.parent_id
            context, step = tree.prefix(parent), node.step
            with torch.no_grad():
                logits = policy(input_ids=torch.tensor([context + step.action_ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            expected = [float(logp[len(context) - 1 + i, t]) for i, t in enumerate(step.action_ids)]
            assert step.action_logprobs == pytest.approx(expected, abs=1e-3)
            assert 0 <= step.prefilled <= len(context)

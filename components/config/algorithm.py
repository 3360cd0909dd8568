"""The RL algorithm: sampling and its token budget, rewards, advantages, the policy update and evaluation.

Reward and estimator names are checked by their registries (`choices.py`), not here.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from arborl.components.config import choices
from arborl.components.config.base import Strict


class SamplingConfig(Strict):
    prompts_per_iteration: int = Field(32, ge=1, description="Training questions per iteration.")
    trees_per_prompt: int = Field(2, ge=1, description="M: trees per prompt, each started from one full chain.")
    expansions_per_round: int = Field(2, ge=1, description="N: nodes drawn (with replacement) per tree per round.")
    expansion_rounds: int = Field(
        1, ge=0, description="L: expansion rounds; 0 is chain mode (M independent chains, the GRPO baseline)."
    )
    keep_leaves: int | None = Field(None, ge=1, description="K: keep at most K random leaves per tree (null: all).")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature.")
    expansion_policy: Literal["random", "entropy", "depth"] = Field(
        "random",
        description="Which nodes a round branches from: random (Tree-GRPO: uniform with replacement over root + "
        "non-leaf nodes), entropy (highest −log p of the sampled tokens first, TreeRL EPTree-style), depth "
        "(a depth uniformly, then a node uniformly within it).",
    )
    entropy_statistic: Literal["max", "mean"] = Field(
        "max", description="entropy policy: a node's uncertainty is the max or the mean −log p of its action tokens."
    )
    shards: int = Field(
        1, ge=1, description="Split each iteration's prompts into this many shards sampled at once, then merged."
    )
    max_bad_fraction: float = Field(
        0.1, ge=0, le=1,
        description="Bad prompts (empty, longer than the context, a tool error) are recorded and left out of "
        "training; the sample stage fails, naming them, when more than this fraction of prompts is bad.",
    )
    backend: Literal["hf", "generate", "vllm"] = Field(
        "hf", description="Generation backend of sampling and evaluation: hf (the in-process engine), generate (the "
        "reference: Hugging Face `model.generate`, any causal LM, slower) or vllm (GPU; the `sampler` image).",
    )


class BudgetConfig(Strict):
    tokens_per_prompt: int | None = Field(
        None, ge=1,
        description="Fix the generated tokens per prompt: after the M initial chains, expansion rounds (chain mode: "
        "one more chain each) go on per prompt until its generated tokens reach this, at most `max_rounds`; "
        "null uses sampling.expansion_rounds as given.",
    )
    chains_per_prompt: float | None = Field(
        None, gt=0,
        description="Fix the cost per prompt in chain equivalents B. Chain mode: M = round(B). Tree mode: L = 1, "
        "M = round(B / (1 + N·expansion_cost)), then N = round((B/M − 1) / expansion_cost); a budget below "
        "1 + expansion_cost gives chains. null uses M/N/L as given.",
    )
    expansion_cost: float = Field(
        0.5, gt=0, le=1,
        description="c: the cost of one expansion relative to a full chain, in the cost model M·(1 + L·N·c) "
        "chains per prompt that `chains_per_prompt` (and `arborl compare`'s tree shape per budget) uses. ½ is the "
        "long-chain limit (a uniformly drawn node regenerates about half a chain); budget.random_expansion_cost "
        "and the sampling bench measure it for a policy (about 0.59 for the trained default policy).",
    )
    max_rounds: int = Field(16, ge=1, description="tokens_per_prompt: most expansion rounds per prompt.")
    chain_unit: Literal["warmstart", "gold"] = Field(
        "warmstart",
        description="arborl compare: the tokens of one chain equivalent, which turn a budget of B chains into "
        "T = round(B × unit) tokens. `warmstart`: the mean generated tokens of one sampled answer of the seed's "
        "warm-start policy. `gold`: the mean generated tokens of a gold chain — one exact search per hop, then the "
        "right answer — over the validation questions (the synthetic world only); use it where the warm start "
        "rarely searches, so that its answers are much shorter than the chains RL learns.",
    )
    token_stop: Literal["reach", "nearest", "exact"] = Field(
        "reach",
        description="tokens_per_prompt: `reach` runs whole rounds until the prompt's generated tokens reach the "
        "budget (it ends at or over it, by up to one round); `nearest` sizes each round to the budget: it takes the "
        "round's branch points (chain mode: up to M new chains) in order while their predicted tokens bring the "
        "prompt nearer the budget and spend at most half of what is left, so a prompt ends within about half an "
        "expansion of it, over or under; `exact` (opt-in) sizes rounds like `nearest` but spends the budget to the "
        "token: each episode may generate only its share of what the prompt has left, a round keeps at least one "
        "branch point while tokens are left, and an episode whose share runs out is cut (finish reason `budget`, "
        "counted as `budget_cuts`). A pool-cut trajectory is never scored as a failure: label leaves it out of "
        "group statistics and the loss, like DAPO's overlong filter.",
    )
    protocol: Literal["shape", "tokens"] = Field(
        "shape",
        description="arborl compare's equal-cost rule. `shape` (default, as in Tree-GRPO's paper): a budget of B "
        "chains only chooses the shapes, B independent chains for GRPO and `budget.shapes[B]` (else `plan`) for "
        "Tree-GRPO; no episode is ever cut for a pool, every trajectory has the same root-relative caps "
        "(agent.max_turns, max_tokens_per_turn, max_total_tokens), and each method's realized cost is reported. "
        "`tokens`: both methods get T = round(B × chain unit) generated tokens per prompt, met with `token_stop` "
        "(`nearest` where set, else `exact`).",
    )
    shapes: dict[float, list[int]] = Field(
        default_factory=lambda: {2.0: [1, 2, 1], 4.0: [2, 2, 1], 8.0: [4, 2, 1], 16.0: [4, 5, 1]},
        description="arborl compare, protocol `shape`: Tree-GRPO's (M, N, L) per budget of B chains, against B "
        "chains for GRPO. The default is the paper's table (its ≈8 row also lists (2, 6, 1)); a budget not listed "
        "takes the shape of `plan`.",
    )

    @field_validator("shapes", mode="before")
    @classmethod
    def _shape_items(cls, value: Any) -> Any:
        """YAML and JSON give budgets as numbers or strings ("2.0" after a dump) and shapes as lists."""
        if not isinstance(value, dict):
            return value
        out = {}
        for key, shape in value.items():
            try:
                budget = float(key)
            except (TypeError, ValueError):
                raise ValueError(f"budget.shapes: {key!r} is no budget (a number of chains)") from None
            if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in shape):
                raise ValueError(f"budget.shapes: {key!r}: {shape!r} is no [M, N, L] of three integers")
            out[budget] = list(shape)
        return out

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetConfig:
        if self.tokens_per_prompt is not None and self.chains_per_prompt is not None:
            raise ValueError("set at most one of budget.tokens_per_prompt and budget.chains_per_prompt")
        for b, shape in self.shapes.items():
            if not math.isfinite(b) or b <= 0 or min(shape) < 1:
                raise ValueError(f"budget.shapes: {b:g}: {list(shape)} must map a positive budget to (M, N, L) >= 1")
        return self


class VerifyConfig(Strict):
    correct_format: float = Field(1.0, description="Reward: correct answer, valid format.")
    correct_bad_format: float = Field(0.8, description="Reward: correct answer, invalid format.")
    wrong_format: float = Field(0.2, description="Reward: wrong answer, valid format.")
    wrong_bad_format: float = Field(0.1, description="Reward: answer present but wrong, invalid format.")
    no_answer: float = Field(0.0, description="Reward: no answer.")
    reward: dict[str, str] = Field(
        default_factory=lambda: {"default": "qa_em_format"},
        description="Outcome reward per data_source; `default` (required) scores every other source. A built-in "
        "by its registered name (qa_em_format, qa_em, qa_f1, math, ...: `describe_rewards()` in "
        "components/verification/rewards.py) or a callable by import path 'package.module:function': TRL's "
        "fn(prompts, completions, **kwargs) -> list[float] (batched) or verl's compute_score(data_source, "
        "solution_str, ground_truth, extra_info=None) -> float | dict with 'score' (and 'acc').",
    )
    require_think: bool = Field(
        False, description="Format check (qa_em_format's format scores, evaluation's valid_format): every model "
        "turn must open with <think>...</think> (Search-R1's variant); a response without it has an invalid format.",
    )
    timeout_s: float = Field(
        10.0, gt=0, description="Seconds one reward call may take (verl and math: per response; TRL: per batch); "
        "past it the responses get reward 0 with the error.",
    )
    reward_input: Literal["response", "prompt_and_response"] = Field(
        "response",
        description="What a verl callable's `solution_str` holds: the response (every model turn, retrieved text "
        "and corrective observations included) or the prompt text followed by it, as Search-R1's reward manager "
        "passes it (its `compute_score_em` needs that: it skips the example <answer> in the prompt's instructions). "
        "TRL callables always get prompts and completions apart.",
    )
    workers: int = Field(
        16, ge=1, le=1024,
        description="Reward calls run at once (verl callables and timed built-ins, per response), in a bounded "
        "pool of threads or processes (isolation); each call is still bounded by timeout_s.",
    )
    isolation: Literal["thread", "process"] = Field(
        "thread",
        description="Where per-response reward calls run. thread: a thread pool; a call past timeout_s scores 0 "
        "and is abandoned, running on in the background until it returns. process: worker processes; a call past "
        "timeout_s is killed with its worker (a new one starts), and a crash of the callable costs only its "
        "response. process costs about a second to start the workers and needs the callable importable from its "
        "spec; use it for rewards that may hang or crash.",
    )
    breaker: int = Field(
        20, ge=0,
        description="Circuit breaker: this many reward calls failing in a row (errors or timeouts) fail the stage "
        "at once instead of waiting out every response; 0 turns it off.",
    )
    max_error_fraction: float = Field(
        0.01, ge=0, le=1,
        description="Reward errors (a call that raises, times out, or returns None, NaN or no number) above this "
        "fraction of a stage's responses fail verify and evaluation, naming the callable, the count and the first "
        "error with its row; fewer give one warning line and the `errors` / `error_fraction` metrics.",
    )
    correct_threshold: float = Field(
        1.0, description="A user callable's response counts as correct when its reward >= this (a verl dict's "
        "'acc' decides instead, when present).",
    )

    @model_validator(mode="after")
    def _rewards_resolve(self) -> VerifyConfig:
        # a model-level error has no key of its own: the message names verify.reward.<source> and the spec
        if "default" not in self.reward:
            raise ValueError("verify.reward has no 'default' key: add `default: qa_em_format` (or another reward) "
                             "for the data sources not listed")
        for source, spec in self.reward.items():
            try:
                choices.check_value("verify.reward", spec)
            except ValueError as exc:
                raise ValueError(f"verify.reward.{source}: {exc}") from None
        return self


class AdvantageConfig(Strict):
    estimator: str = Field(
        "tree", description="Advantage estimator, by its registered name: tree (Tree-GRPO's intra- plus inter-tree "
        "advantage), grpo, and the others `describe_estimators()` lists (components/advantages/registry.py).",
    )
    eps: float = Field(1e-6, gt=0, le=1, description="Added to the std in the normaliser.")
    export_preferences: bool = Field(
        True, description="Write sibling-subtree preference pairs (TRL DPO format) to preferences.parquet."
    )
    preference_margin: float = Field(
        0.1, gt=0, description="Least subtree-value gap |V(a) − V(b)| between two siblings that makes a pair."
    )

    @field_validator("estimator")
    @classmethod
    def _registered(cls, name: str) -> str:
        return choices.check_value("advantage.estimator", name)  # ValueError listing the registered names


class LoraSettings(Strict):
    enabled: bool = Field(False, description="Train low-rank adapters (peft LoRA) instead of all weights.")
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the adapter update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the linear modules that get adapters (Llama/Qwen: q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj, down_proj).",
    )


class TrainConfig(Strict):
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="LoRA adapters; off by default (full fine-tuning for tiny models)."
    )
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: ddp (gradients summed across ranks) or fsdp (CUDA only); none refuses "
        "to run with more than one rank. Ignored in a single process."
    )
    bf16: bool = Field(False, description="bfloat16 autocast for forward passes (CUDA; CPU autocast is slow).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    flex_attention: bool = Field(
        False, description="Packed form: run the policy with FlexAttention and a tree BlockMask instead of a dense "
        "T×T mask (for long trees on CUDA; the saved model keeps its own attention setting).",
    )
    save_every_steps: int = Field(
        0, ge=0, description="Checkpoint model, optimizer and RNG state every this many optimizer steps inside a "
        "train stage (0: never); a rerun of a killed stage resumes from the last one."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept per train stage (oldest removed).")
    save_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the model weights the warm start and each iteration save for sampling, "
        "evaluation and the registry. When it is narrower than the weights trained, the full-precision master "
        "weights go into the training state (optimizer.pt) and the next iteration continues from them, so "
        "training loses no precision across iterations. That state is kept for every iteration unless "
        "run.keep_iterations is set: bfloat16 saves disk only together with it.",
    )
    checkpoint_every: int = Field(
        10, ge=1, description="Write the training state (Adam moments, master weights) every this many iterations "
        "and at the last; in between only the weights in save_dtype. Applies where the state can stay in memory "
        "(orchestration.executor inprocess, one process, no LoRA); other executors write it every iteration. A "
        "restart rebuilds an unwritten state by replaying the updates since the last one written, checked to "
        "reproduce the saved weights bit for bit.",
    )
    lr: float = Field(5e-4, gt=0, lt=1, description="Adam learning rate.")
    clip_low: float = Field(0.2, gt=0, lt=1, description="PPO ε_low: the ratio is clipped below at 1 − ε_low.")
    clip_high: float = Field(
        0.2, gt=0, le=1, description="PPO ε_high: the ratio is clipped above at 1 + ε_high (clip-higher uses ~0.28)."
    )
    dual_clip: float = Field(3.0, gt=1, description="Dual-clip constant c for negative advantages.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over the batch per iteration.")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per epoch.")
    micro_batch_size: int = Field(64, ge=1, description="Duplicated form: trajectories per forward/backward.")
    form: Literal["packed", "duplicated"] = Field(
        "packed",
        description="packed: each tree once, with a tree attention mask (exact, fewer tokens); duplicated: every "
        "root→leaf path its own sequence (the reference form; used automatically if the model ignores 4D masks).",
    )
    max_tokens_per_microbatch: int = Field(
        8192, ge=1, description="Packed form: trees per forward/backward are packed up to rows × longest ≤ this."
    )
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean",
        description="token-mean: over all trainable tokens of the mini-batch counted with multiplicity; "
        "seq-mean-token-mean: mean over trajectories of each one's token mean (GRPO); seq-mean-token-sum-norm: "
        "token sums over trajectories × seq_sum_horizon (Dr.GRPO).",
    )
    seq_sum_horizon: int = Field(256, ge=1, description="Constant token divisor of seq-mean-token-sum-norm.")
    kl_coef: float = Field(0.0, ge=0, description="β of the KL penalty to the frozen warm-start model; 0 loads none.")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k3", description="k1 = log-ratio; k3 = low-variance KL (verl low_var_kl)."
    )
    entropy_coef: float = Field(0.0, ge=0, description="γ of the entropy bonus (0 = off).")


class EvaluateConfig(Strict):
    temperature: float = Field(1.0, gt=0, le=10, description="Temperature of the sampled evaluation.")
    batch_size: int = Field(256, ge=1, description="Questions generated together.")
    pass_k: list[int] = Field(
        default_factory=lambda: [1, 4],
        description="k values of pass@k; the sampled evaluation draws max(pass_k) samples per question.",
    )
    bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples for the 95% intervals of eval metrics.")

    @model_validator(mode="after")
    def _pass_k(self) -> EvaluateConfig:
        if not self.pass_k or min(self.pass_k) < 1:
            raise ValueError(f"evaluate.pass_k must be a non-empty list of k >= 1, got {self.pass_k}")
        return self

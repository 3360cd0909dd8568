"""Typed configuration: pydantic models (unknown keys are errors), YAML files and `key.sub=value` overrides.

Every field carries its help text; `configs/tiny.yaml` documents the same keys with comments.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from arborl.components.advantages.registry import check_training, describe_estimators, get_estimator
from arborl.components.envs.protocol import SEARCH_R1_TEMPLATE
from arborl.components.verification.rewards import describe_rewards, resolve_reward


class Strict(BaseModel):
    """Unknown keys are errors, and values are not coerced: `true` is no integer, `1` no boolean, `"3"` no number
    (an integer is a valid float); numbers are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class RunConfig(Strict):
    name: str = Field("tiny", description="Run name (letters, digits, '.', '_', '-'); outputs go to "
                      "<output_root>/<name>/.")
    output_root: str = Field("runs", description="Root URI (local path or s3://...) for all run outputs.")
    seed: int = Field(0, description="Global seed: world, sampling, training and evaluation derive from it.")
    iterations: int = Field(40, ge=0, description="RL iterations (sample → verify → label → train → evaluate).")
    eval_every: int = Field(10, ge=1, description="Evaluate on val/test every this many iterations (the last always).")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default.")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where models run; auto picks cuda when present.")
    warmstart_from: str | None = Field(
        None,
        description="Root URI of an earlier run with the same world/model/warmstart settings and seed: reuse its "
        "prepare and warm-start outputs (checked by their manifests) instead of running them; null runs them.",
    )
    keep_iterations: int | None = Field(
        None, ge=1,
        description="Keep the model directories of the last K RL iterations (plus the warm-start model, every "
        "registered model and the LoRA base of a kept one); after each iteration the weights of older iterations "
        "are deleted, their manifests stay marked `pruned` (a rerun skips them, a reader gets an error naming "
        "them). With K set, the training state (optimizer.pt: Adam moments and full-precision master weights) "
        "is kept for the newest iteration only, which is all a resumed run needs; a rerun that retrains an older "
        "iteration (other train settings) then starts it with fresh moments from its saved weights. null keeps "
        "everything.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        """A directory name under `output_root`, never a path: no separators, `..` or surrounding spaces."""
        if not value or value in (".", "..") or not set(value) <= _NAME_CHARS:
            raise ValueError(f"must be a plain name of letters, digits, '.', '_' and '-' (no '/', '\\', spaces, "
                             f"'.' or '..'), got {value!r}")
        return value


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class WorldConfig(Strict):
    num_people: int = Field(600, ge=10, description="People in the synthetic knowledge base.")
    num_cities: int = Field(40, ge=3, description="Cities.")
    num_countries: int = Field(12, ge=2, description="Countries.")
    num_companies: int = Field(30, ge=2, description="Companies.")
    hop_mix: dict[int, float] = Field(
        default_factory=lambda: {1: 0.2, 2: 0.5, 3: 0.3},
        description="Share of questions per hop count (1 to 4; 4-hop questions start with two mentor hops or a "
        "mentor hop and a company hop); normalised.",
    )
    distractors: float = Field(
        0.0, ge=0, le=4,
        description="Distractor people per real person (the same share of distractor companies per real company); "
        "0 = none. A distractor person shares the first name or the surname of a real person, a distractor company "
        "is a real company's name with one more word in front; each has its own facts in the search corpus, so a "
        "query that drops a name part retrieves a wrong fact. Distractors are never question subjects or answers.",
    )
    test_people_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of people held out as test subjects.")
    val_people_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of people held out as val subjects.")
    num_train: int = Field(4000, ge=1, description="Training questions (demonstrations and RL prompts).")
    num_val: int = Field(100, ge=1, description="Fixed validation questions.")
    num_test: int = Field(300, ge=1, description="Fixed test questions (held-out people only).")

    @field_validator("hop_mix", mode="before")
    @classmethod
    def _hop_keys(cls, value: Any) -> Any:
        """JSON turns the hop counts into strings ("1"); read them back as integers."""
        if isinstance(value, dict):
            return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _hops(self) -> WorldConfig:
        bad = [h for h in self.hop_mix if h not in (1, 2, 3, 4)]
        if bad or not self.hop_mix or min(self.hop_mix.values()) < 0 or sum(self.hop_mix.values()) <= 0:
            raise ValueError(f"world.hop_mix keys must be 1, 2, 3 or 4 with non-negative shares, got {self.hop_mix}")
        return self


class DataConfig(Strict):
    source: Literal["synthetic", "parquet"] = Field(
        "synthetic", description="Where the prompts come from: synthetic (questions of the world built from "
        "`world`) or parquet (verl / Search-R1 Parquet files, read unchanged).",
    )
    train_files: list[str] = Field(
        default_factory=list, description="parquet: training files (local paths or s3:// URIs), verl naming."
    )
    val_files: list[str] = Field(default_factory=list, description="parquet: validation files; may be empty.")
    test_files: list[str] = Field(default_factory=list, description="parquet: test files.")
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1,
        description="parquet: unusable rows (no user message, no ground truth, wrong types, duplicate ids) are "
        "skipped and listed; the prepare stage fails, naming them, when more than this share of all rows is bad.",
    )
    batch_rows: int = Field(4096, ge=1, description="parquet: rows per record batch when streaming a file.")
    snapshot_root: str | None = Field(
        None, description="parquet: URI of a folder whose sub-folders are dated data snapshots (e.g. "
        "s3://bucket/nq/ holding 2026-11-23/, 2026-11-30/); the data files are then read from the chosen snapshot "
        "folder (empty file lists: train.parquet, val.parquet, test.parquet).",
    )
    snapshot: str = Field(
        "latest", description="snapshot_root: the snapshot folder's name, or latest (the greatest name present, "
        "resolved once when a run starts and recorded with it).",
    )

    @field_validator("snapshot", mode="before")
    @classmethod
    def _date_name(cls, value: Any) -> Any:
        # YAML reads an unquoted 2026-11-30 as a date; the folder's name is its ISO form
        return value.isoformat() if isinstance(value, datetime.date) else value

    @model_validator(mode="after")
    def _files(self) -> DataConfig:
        if self.snapshot_root is not None:
            if not self.snapshot_root.strip():
                raise ValueError("data.snapshot_root is empty: give the snapshots' folder URI or null")
            if self.source != "parquet":
                raise ValueError("data.snapshot_root is set but data.source is 'synthetic': snapshots hold Parquet "
                                 "files; set data.source: parquet")
            if not self.snapshot or "/" in self.snapshot or self.snapshot in (".", ".."):
                raise ValueError(f"data.snapshot must be a snapshot folder's name or latest, got {self.snapshot!r}")
            return self  # empty file lists mean the snapshot's train/val/test.parquet
        if self.source == "parquet" and not (self.train_files and self.test_files):
            raise ValueError("data.source=parquet needs non-empty data.train_files and data.test_files "
                             "(or data.snapshot_root)")
        return self


class SearchConfig(Strict):
    backend: Literal["fts", "http"] = Field(
        "fts", description="Where the search tool looks: fts (an in-process SQLite FTS5 index of the world's facts) "
        "or http (a retrieval server with Search-R1's API at `url`, e.g. `arborl serve-retriever`).",
    )
    url: str | None = Field(
        None, description="http: base URL of the retrieval server (POST <url>/retrieve), e.g. http://127.0.0.1:8000.",
    )
    topk: int = Field(3, ge=1, description="Documents the search tool returns per query.")
    timeout_s: float = Field(10.0, gt=0, description="http: seconds one request may take.")
    retries: int = Field(3, ge=0, description="http: further tries of a failed request (connection error, "
                         "timeout, HTTP 5xx, malformed answer) before its queries get a tool error.")
    backoff_s: float = Field(0.5, ge=0, description="http: wait before retry i is backoff_s · 2^i seconds.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/") if value is not None else None

    @model_validator(mode="after")
    def _url_for_http(self) -> SearchConfig:
        if self.backend == "http" and not self.url:
            raise ValueError("search.backend=http needs search.url (the retrieval server's base URL)")
        return self


class ModelConfig(Strict):
    path: str | None = Field(
        None, description="A Hugging Face causal-LM directory (local or s3://) with its tokenizer files, e.g. a "
        "Qwen2.5 or Llama-3.2 checkpoint; null builds a tiny Llama with the synthetic world's word-level tokenizer.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the policy is loaded in for sampling and evaluation (bfloat16 for "
        "billion-parameter models); training keeps float32 master weights (`train.bf16` autocasts its forward).",
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="auto: prompts go through the tokenizer's own chat template with a generation prompt, "
        "when it has one; none: the messages' contents are fed as plain text (after BOS, where the tokenizer "
        "defines one).",
    )
    hidden_size: int = Field(128, ge=8, description="Hidden size of the tiny Llama.")
    num_layers: int = Field(2, ge=1, description="Transformer layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    intermediate_size: int = Field(512, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(512, ge=32, description="Context window in tokens.")

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size {self.hidden_size} must be a multiple of model.num_heads "
                             f"{self.num_heads}")
        return self


class WarmstartConfig(Strict):
    enabled: bool = Field(
        True, description="Supervised warm start on demonstrations of the synthetic world; false starts RL from "
        "`model.path` as it is (the stage then only saves it as the run's iteration-0 model).",
    )
    num_demos: int = Field(6000, ge=1, description="Demonstration episodes generated from train questions.")
    steps: int = Field(2500, ge=0, description="Optimizer steps of supervised warm start.")
    batch_size: int = Field(32, ge=1, description="Demonstrations per step.")
    lr: float = Field(2e-3, gt=0, lt=1, description="Peak AdamW learning rate (cosine decay).")
    early_answer_prob: float = Field(
        0.5, ge=0, le=1,
        description="Per remaining hop, chance a demonstration stops searching and guesses an answer.",
    )
    sloppy_query_prob: float = Field(0.2, ge=0, le=1, description="Chance a demonstration query drops the first name.")


class AgentConfig(Strict):
    max_turns: int = Field(4, ge=1, description="Model turns per episode (search calls + answer).")
    max_tokens_per_turn: int = Field(16, ge=2, description="Cap on generated tokens in one turn.")
    max_total_tokens: int = Field(256, ge=16, description="Cap on the whole episode (prompt + turns + observations).")
    node_mode: Literal["turn", "segment"] = Field(
        "turn",
        description="What a tree node is: 'turn' = one agent step (action + tool observation); 'segment' = a piece "
        "of one tool-free generation, cut at `segment_delimiter` or every `segment_tokens` tokens (math-style data).",
    )
    segment_tokens: int = Field(32, ge=1, description="Segment mode: most generated tokens in one node.")
    prompt_template: str = Field(
        SEARCH_R1_TEMPLATE,
        description="User message built around each synthetic question (`{question}` is replaced by it); the "
        "default is Search-R1's instruction. Parquet prompts are chat messages already and are used unchanged.",
    )
    on_invalid: Literal["continue", "stop"] = Field(
        "stop",
        description="A turn that neither searches nor answers: continue answers it with Search-R1's corrective "
        "observation and goes on (up to max_turns); stop ends the episode there.",
    )
    segment_delimiter: str | None = Field(
        None,
        description="Segment mode: text of ONE token that also ends a node (kept in it), e.g. '\n\n' (a blank "
        "line) for a BPE tokenizer that has it as one token; null cuts by length only. In segment mode "
        "`max_turns` caps the segments of an episode.",
    )


    @field_validator("prompt_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(question="q")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"must be a format string whose only field is {{question}} ({exc!r}); write a "
                             "literal brace as {{ or }}") from None
        if "{question}" not in value:
            raise ValueError("must contain {question}")
        return value


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
        description="Outcome reward per data_source; `default` (required) scores every other source. A built-in ("
        + describe_rewards() + ") or a callable by import path 'package.module:function': TRL's "
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
                resolve_reward(spec)
            except ValueError as exc:
                raise ValueError(f"verify.reward.{source}: {exc}") from None
        return self


class AdvantageConfig(Strict):
    estimator: str = Field(
        "tree", description="Advantage estimator, by its registered name (components/advantages/registry.py): "
        + describe_estimators(),
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
        get_estimator(name)  # ValueError listing the registered names
        return name


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


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; null uses $MLFLOW_TRACKING_URI or sqlite:///<output_root>/mlflow.db."
    )
    experiment: str = Field("arborl", description="MLflow experiment name.")
    enabled: bool = Field(True, description="Log to MLflow at all.")
    system_metrics: bool = Field(
        True, description="Log MLflow system metrics (system/*: CPU, memory, disk, network, GPU) for the run, "
        "sampled every 10 s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it).",
    )


class StorageConfig(Strict):
    cache_max_gb: float = Field(
        20.0, ge=0, description="Most GB of local copies of remote (s3://) model directories kept in the cache "
        "($TMPDIR/arborl-cache); beyond it the least recently used copies are deleted. Optimizer state is never "
        "copied. 0 keeps only the copies in use.",
    )


class ViewerConfig(Strict):
    max_prompts: int = Field(
        16, ge=0, description="Prompts whose trees the label stage draws into trees.html; 0 writes no viewer."
    )


class RegistryConfig(Strict):
    enabled: bool = Field(True, description="Register the final model and run the gated promotion (needs tracking).")
    model_name: str = Field("arborl-tiny", description="Registered model name in the MLflow model registry.")
    gate_metric: Literal["em", "f1", "reward", "em_sampled", "f1_sampled", "reward_sampled"] = Field(
        "em", description="Per-question score the gate compares: greedy em/f1/reward or their mean over samples."
    )
    margin: float = Field(
        0.0, description="Promote only when the bootstrap lower bound of the paired improvement exceeds this."
    )
    split: Literal["val", "test"] = Field(
        "val", description="Questions both models are evaluated on for the gate (test metrics are only reported)."
    )


# The pipeline's stage names (components/stages STAGES holds the same keys); orchestration's per-stage dicts
# accept these and `default`.
STAGE_NAMES = ("prepare", "warmstart", "sample", "verify", "label", "train", "evaluate")
GPU_STAGES = ("warmstart", "sample", "train", "evaluate")  # run the policy model: one GPU each by default
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CPU = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
_MEMORY = re.compile(r"^\d+(Ki|Mi|Gi|Ti)?$")


class StageResources(Strict):
    cpu: str | None = Field(
        None, description="CPU cores requested (Kubernetes quantity: 2, 0.5 or 500m; docker --cpus); null: no request."
    )
    memory: str | None = Field(
        None, description="Memory limit as bytes or with Ki/Mi/Gi/Ti (e.g. 16Gi; docker --memory 16g); null: none.",
    )
    gpus: int = Field(0, ge=0, description="GPUs: Kubernetes nvidia.com/gpu requests and limits, docker --gpus N.")

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and not _CPU.match(value):
            raise ValueError(f"must be a number of cores such as 2, 0.5 or 500m, got {value!r}")
        return value

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and not _MEMORY.match(value):
            raise ValueError(f"must be bytes or a number with Ki/Mi/Gi/Ti such as 16Gi, got {value!r}")
        return value


class SecretRef(Strict):
    name: str = Field(..., description="Kubernetes Secret name (docker: the variable is passed from the launcher's "
                      "environment or orchestration.env_file, never written on the command line).")
    key: str = Field(..., description="Key inside the Secret whose value becomes the variable.")


class VolumeConfig(Strict):
    mount_path: str = Field(..., description="Absolute path inside the stage container.")
    host_path: str | None = Field(None, description="docker: host directory bind-mounted there.")
    claim: str | None = Field(None, description="kubernetes: PersistentVolumeClaim mounted there.")
    read_only: bool = Field(False, description="Mount read-only.")

    @model_validator(mode="after")
    def _source(self) -> VolumeConfig:
        if not self.mount_path.startswith("/"):
            raise ValueError(f"mount_path must be absolute, got {self.mount_path!r}")
        if self.host_path is None and self.claim is None:
            raise ValueError(f"{self.mount_path} needs host_path (docker) or claim (kubernetes)")
        return self


def _default_resources() -> dict[str, StageResources]:
    return {name: StageResources(gpus=1 if name in GPU_STAGES else 0) for name in STAGE_NAMES}


class OrchestrationConfig(Strict):
    executor: Literal["inprocess", "subprocess", "docker", "kubernetes"] = Field(
        "inprocess", description="Where each stage runs: inprocess (the flow's task process), subprocess (a child "
        "`arborl stage` process in the same environment), docker (a `docker run` container per stage) or kubernetes "
        "(a batch/v1 Job per stage). Every executor but inprocess reads the run's resolved config from "
        "<output_root>/<run.name>/config.json, so the output root must be reachable from where the stage runs.",
    )
    container_cli: Literal["docker", "podman"] = Field(
        "docker", description="docker executor: the container CLI that runs the stage containers (podman takes "
        "the same `run` arguments; rootless podman also gets --userns=keep-id, so files keep the user's uid).",
    )
    container_args: list[str] = Field(
        default_factory=list, description="docker executor: global arguments of the container CLI, before `run` "
        "(e.g. [--runtime, /path/to/infra/container/runc-no-rlimits] for podman where containers may not set "
        "resource limits).",
    )
    container_run_args: list[str] = Field(
        default_factory=list, description="docker executor: further arguments of `run`, before the image (e.g. "
        "[--network, host]).",
    )
    command: list[str] = Field(
        default_factory=lambda: ["arborl"], description="The command prefix that runs `stage ...` (the image's "
        "entrypoint is replaced by it); subprocess resolves a bare `arborl` to this environment's.",
    )
    images: dict[str, str] = Field(
        default_factory=lambda: {"default": "arborl:latest"}, description="docker/kubernetes: image per stage name; "
        "`default` for the stages not named (e.g. {default: arborl:latest, sample: arborl-sampler:latest}).",
    )
    resources: dict[str, StageResources] = Field(
        default_factory=_default_resources, description="docker/kubernetes: cpu, memory and gpus per stage name; "
        "entries given replace those stages' defaults, the others keep theirs (warmstart, sample, train, evaluate: "
        "1 GPU; prepare, verify, label: CPU only).",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables set in every stage "
                                "process/container (e.g. AWS_ENDPOINT_URL, HF_HOME).")
    secret_env: dict[str, SecretRef] = Field(
        default_factory=dict, description="Environment variables taken from secrets, by reference only (e.g. "
        "AWS_SECRET_ACCESS_KEY: {name: s3-credentials, key: secret-key}): Kubernetes secretKeyRef; docker passes "
        "the variable from the launcher's environment.",
    )
    env_file: str | None = Field(None, description="docker: an --env-file with further variables (e.g. secrets).")
    volumes: list[VolumeConfig] = Field(default_factory=list, description="Extra volumes mounted into every stage "
                                        "container (docker host_path, kubernetes claim).")
    namespace: str = Field("default", description="kubernetes: namespace of the stage Jobs.")
    service_account: str | None = Field(None, description="kubernetes: service account of the stage pods.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="kubernetes: the containers' imagePullPolicy."
    )
    backoff_limit: int = Field(0, ge=0, description="kubernetes: Job retries before it fails (the flow's task "
                               "retries once on its own).")
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="kubernetes: seconds a finished Job is kept.")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="kubernetes: seconds a stage Job may run before it is failed; null: no limit."
    )
    poll_seconds: float = Field(5.0, gt=0, description="kubernetes: seconds between Job status checks.")
    dask_address: str | None = Field(
        None, description="With sampling.shards > 1: the address of a Dask scheduler (e.g. tcp://10.0.0.5:8786) "
        "whose workers run the sample shards; null runs them on a local process pool.",
    )

    @field_validator("images", "resources")
    @classmethod
    def _stage_keys(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        allowed = STAGE_NAMES + (("default",) if info.field_name == "images" else ())
        for key in value:
            if key not in allowed:
                raise ValueError(f"unknown stage {key!r}; use one of {', '.join(allowed)}")
        return value

    @field_validator("resources", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any) -> Any:
        # a partial dict (e.g. {train: {gpus: 2}}) replaces only those stages' entries
        return {**_default_resources(), **value} if isinstance(value, dict) else value

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is no environment variable name")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least the program (e.g. [arborl])")
        return value

    @model_validator(mode="after")
    def _every_stage_has_an_image(self) -> OrchestrationConfig:
        both = sorted(set(self.env) & set(self.secret_env))
        if both:
            raise ValueError(f"orchestration: {', '.join(both)} set in both env and secret_env")
        if self.executor in ("docker", "kubernetes") and "default" not in self.images:
            missing = [s for s in STAGE_NAMES if s not in self.images]
            if missing:
                raise ValueError(f"orchestration.executor={self.executor} needs an image for {', '.join(missing)}: "
                                 "add them or a default to orchestration.images")
        return self

    def image(self, stage: str) -> str:
        """The container image of `stage`."""
        return self.images.get(stage) or self.images["default"]

    def stage_resources(self, stage: str) -> StageResources:
        """cpu/memory/gpus of `stage`."""
        return self.resources.get(stage) or StageResources()


class Config(Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    world: WorldConfig = Field(default_factory=WorldConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    warmstart: WarmstartConfig = Field(default_factory=WarmstartConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    viewer: ViewerConfig = Field(default_factory=ViewerConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="after")
    def _estimator_fits_training(self) -> Config:
        # a model-level error has no key of its own: the message names advantage.estimator and the train key
        check_training(self.advantage.estimator, self.train.form, self.train.loss_aggregation)
        return self

    @model_validator(mode="after")
    def _start_model(self) -> Config:
        if not self.warmstart.enabled and self.model.path is None:
            raise ValueError("warmstart.enabled is false but model.path is null: without a warm start RL starts "
                             "from model.path, so set it (or set warmstart.enabled: true)")
        return self

    @model_validator(mode="after")
    def _parquet_needs_its_own_model_and_retriever(self) -> Config:
        # Parquet prompts come without the synthetic world: no facts to search in-process, no demonstrations
        if self.data.source == "parquet":
            if self.search.backend != "http":
                raise ValueError("data.source is 'parquet' but search.backend is 'fts': Parquet data has no "
                                 "in-process corpus; set search.backend: http and search.url (e.g. a server "
                                 "started with `arborl serve-retriever`)")
            if self.warmstart.enabled:
                raise ValueError("data.source is 'parquet' but warmstart.enabled is true: the warm start "
                                 "demonstrates the synthetic world only; set warmstart.enabled: false and model.path")
        return self

    def section_hash(self, *sections: str, **params: Any) -> str:
        """Stable hash of the named sections (all when none), the seed and extra params; manifests use it
        to tell whether a finished stage was made with the same settings."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        else:  # where stages run does not change what they make
            data.pop("orchestration", None)
        payload = {"config": data, "seed": self.run.seed, "params": params}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the file and key."""


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core scalars instead of YAML 1.1's: integers are decimal digits only
    (no sexagesimal `1:30` = 90, no octal `010` = 8, no `0x10`), booleans are only true/false (not yes/no/on/off),
    floats include `1e-3` without a dot; and a mapping that repeats a key is an error rather than the last one
    silently winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                                                              "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_YAMLLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 10))
INT_LIMIT = 2**63  # integers are 64-bit signed where they go (seeds, counts): anything larger is refused


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 (a safe loader)


def _check_ints(data: Any, source: str, path: str = "") -> None:
    """Refuse an integer outside the 64-bit signed range, naming its key."""
    if isinstance(data, dict):
        for key, value in data.items():
            _check_ints(value, source, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _check_ints(value, source, f"{path}[{i}]")
    elif isinstance(data, int) and not isinstance(data, bool) and not -INT_LIMIT <= data < INT_LIMIT:
        raise ConfigError(f"{source}: key {path!r}: {data} is outside the 64-bit integer range")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", value) with the value parsed as YAML (so 3, 0.1, true, null, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, _yaml(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (default `configs/tiny.yaml`) and apply `key.sub=value` overrides. A `.json` file (e.g. a
    run's resolved `<run root>/config.json`) is read as JSON; a URI (s3://...) is read through artifacts/storage.py,
    so stage containers share one resolved config.

    Raises ConfigError naming the file and the offending key.
    """
    if path is not None and "://" in str(path):
        path = str(path)
        text = _read_uri(path)
    else:
        path = Path(path) if path is not None else DEFAULT_CONFIG
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if str(path).endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    else:
        try:
            data = _yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a config states at least one section (see configs/tiny.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value, str(path))
    return config_from_dict(data, source=str(path))


def _read_uri(uri: str) -> str:
    from arborl.components.artifacts import storage

    try:
        if not storage.exists(uri):
            raise ConfigError(f"config file not found: {uri}")
        return storage.read_bytes(uri).decode()
    except (OSError, ValueError) as exc:  # no such bucket, no credentials, not UTF-8
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{uri}: cannot read the config: {exc}") from None


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    _check_ints(data, source)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key {key!r}")
            elif len(err["loc"]) > 1 or err["type"] != "value_error":
                problems.append(f"key {key!r}: {err['msg'].removeprefix('Value error, ')}")
            else:  # a check across the keys of a section or of sections: its message names them
                problems.append(err["msg"].removeprefix("Value error, "))
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None

"""The run, its world and data, the search tool, the model, the warm start and the agent loop."""

from __future__ import annotations

import datetime
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from arborl.components.config.base import Strict

# The default of `agent.prompt_template`: Search-R1's instruction (envs/protocol.py re-exports it for the agent).
SEARCH_R1_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get "
    "new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge needed, "
    "you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. For "
    "example, <answer> Beijing </answer>. Question: {question}\n"
)


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

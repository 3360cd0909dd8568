"""What every stage shares: the skip-if-done / write-manifest-last wrapper and small loaders.

A stage module keeps its work in a named module-level function (`prepare_world`, `train_policy`, ...)
returning (output URIs, metrics); its `run` binds that function's arguments (`functools.partial`) and hands
it to `run_stage`, so a traceback names the stage's work."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from arborl.components.artifacts import manifests, schemas, stage_keys, storage
from arborl.components.config import Config
from arborl.components.envs.http_retriever import HTTPRetriever
from arborl.components.envs.retriever import FTSRetriever, Retriever
from arborl.components.stages.contract import StageResult


def run_stage(
    stage: str,
    cfg: Config,
    inputs: dict[str, str],
    out: str,
    sections: tuple[str, ...],
    work: Callable[[], tuple[dict[str, str], dict[str, Any]]],
    *,
    keep: tuple[str, ...] = (),
    writer: bool = True,
    **params: Any,
) -> StageResult:
    """Run `work` unless `out` already holds a finished output with the same key — its inputs' identities (their
    keys and file digests), config sections and params (`stage_keys`) — and intact files.

    `work` is the stage's work with its arguments bound (e.g. `partial(verify_leaves, cfg, inputs, out)`): it
    writes its files under `out` and returns (output URIs, metrics); the manifest is written last.
    Entries of `out` named in `keep` survive the wipe of a half-written output (the stage's own resume state).
    `writer=False` (the non-zero ranks of a distributed stage) runs `work` without touching `out` or the manifest.

    A stage owns only what it created: before anything is written, `out` is refused (`manifests.OutputNotOwned`,
    nothing deleted) when it is, lies inside or contains an input, is an existing file, or is a non-empty
    directory without this stage's manifest or marker (see `manifests.check_output`).
    """
    manifests.check_output(out, stage=stage, inputs=inputs, contents=False)
    config_hash = cfg.section_hash(*sections, **params)
    done = stage_keys.completed(out, stage=stage, inputs=inputs, config_hash=config_hash)
    if done is not None:
        return StageResult.from_manifest(out, done)
    stage_keys.check_inputs(stage, inputs)  # before anything of `out` is wiped
    key = stage_keys.stage_key(stage, config_hash, inputs)
    if writer:
        manifests.prepare_output(out, stage=stage, inputs=inputs, keep=keep)
    started = time.time()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    outputs, metrics = work()
    if not writer:
        return StageResult(stage, out, outputs, metrics, round(time.time() - started, 3))
    manifest = manifests.write_manifest(
        out, stage=stage, inputs=inputs, config_hash=config_hash, outputs=outputs, metrics=metrics, started=started,
        key=key, files=stage_keys.file_digests(out),
    )
    return StageResult(stage, out, outputs, metrics, manifest["seconds"])


def device(cfg: Config) -> str:
    if cfg.run.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.run.device


def load_retriever(world_uri: str, cfg: Config) -> Retriever:
    """The search tool of `cfg.search`: a client of the retrieval server at `search.url` (backend http; the
    world's facts are not read), else an in-process index of the world's facts."""
    search = cfg.search
    if search.backend == "http":
        return HTTPRetriever(search.url, topk=search.topk, timeout_s=search.timeout_s, retries=search.retries,
                             backoff_s=search.backoff_s)
    return FTSRetriever.from_facts(schemas.read(storage.join(world_uri, schemas.FACTS_FILE), schemas.FACTS),
                                   top_k=search.topk)

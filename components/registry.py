"""Model registry and gated promotion.

* `register_final_model`: the run's final model directory is logged with MLflow's transformers flavor,
  registered under `registry.model_name`, given the alias `challenger` and tagged with the run, the
  config hash and the eval metrics.
* `gate`: the promotion decision as a pure function of two per-question score arrays.
* `promote`: evaluates `challenger` and the current `champion` (or, for the first model, the run's
  warm-start model) on the same questions with the same seed, runs the gate, writes the decision to the
  challenger version's tags (`gate.*`, also who was champion before and after) and its description (one
  sentence), and moves `champion` only on success. A failed or incomplete evaluation never promotes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from arborl.components.artifacts import manifests, model_files, schemas, storage
from arborl.components.artifacts.failpoints import failpoint
from arborl.components.config import Config
from arborl.components.evaluation.evaluate import question_scores
from arborl.components.evaluation.metrics import paired_bootstrap
from arborl.components.stages.base import load_prompts
from arborl.components.tracking.store import check_tracking_uri, tracking_uri
from arborl.components.tracking.tags import (
    CONFIG_HASH_TAG,
    DATA_SNAPSHOT_TAG,
    DATA_URI_TAG,
    MODEL_URI_TAG,
    ORIGIN_TAG,
    PARENT_MODEL_URI_TAG,
    PARENT_VERSION_TAG,
    RUN_ID_TAG,
    RUN_ROOT_TAG,
    WARMSTART_MODEL_TAG,
    WEIGHTS_TAG,
    WORLD_TAG,
)

CHALLENGER, CHAMPION = "challenger", "champion"
DECISION_FILE = "decision.json"  # the gate's decision, under the run's promote_v<version>/
PROMOTE, REJECT, INCOMPLETE = "promote", "reject", "incomplete"


# --- the gate (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    """Outcome of comparing a challenger with a baseline on the same questions (scores in [0, 1] per question).

    `delta` is the mean per-question improvement challenger − baseline; `ci_low`/`ci_high` its 95% paired
    bootstrap interval; `n` the number of paired questions.
    """

    decision: str  # promote / reject / incomplete
    reason: str
    metric: str
    margin: float
    n: int
    challenger: float = math.nan
    baseline: float = math.nan
    delta: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTE

    def tags(self) -> dict[str, str]:
        """The decision as registry tags `gate.<field>`."""
        return {f"gate.{k}": (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in asdict(self).items()}


def gate(
    challenger: np.ndarray | list[float] | None,
    baseline: np.ndarray | list[float] | None,
    margin: float,
    metric: str = "em",
    expected: int | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> GateDecision:
    """Promote when the mean paired improvement is positive and its bootstrap lower bound exceeds `margin`.

    `challenger` and `baseline` hold one score per question in the same question order (None: that
    evaluation failed). Missing scores, NaN, unequal lengths or fewer than `expected` questions give
    `incomplete`, which never promotes.
    """

    def incomplete(reason: str, n: int = 0) -> GateDecision:
        return GateDecision(INCOMPLETE, reason, metric, margin, n)

    if challenger is None or baseline is None:
        return incomplete(f"{'challenger' if challenger is None else 'baseline'} evaluation failed")
    a, b = np.asarray(challenger, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        return incomplete(f"challenger has {a.size} scores, baseline {b.size}")
    if a.size == 0 or (expected is not None and a.size < expected):
        return incomplete(f"{a.size} scores for {expected} questions", a.size)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        missing = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
        return incomplete(f"{missing} missing or NaN scores", a.size)
    ci = paired_bootstrap(a, b, resamples=resamples, seed=seed)
    stats = {"n": a.size, "challenger": float(a.mean()), "baseline": float(b.mean()), "delta": ci.estimate,
             "ci_low": ci.low, "ci_high": ci.high}
    if ci.estimate > 0 and ci.low > margin:
        return GateDecision(PROMOTE, f"improvement {ci.estimate:+.4f}, lower bound {ci.low:.4f} > margin {margin}",
                            metric, margin, **stats)
    why = "no improvement" if ci.estimate <= 0 else f"lower bound {ci.low:.4f} <= margin {margin}"
    return GateDecision(REJECT, f"improvement {ci.estimate:+.4f}: {why}", metric, margin, **stats)


def paired_scores(scores: dict[str, float] | None, question_ids: list[str]) -> np.ndarray | None:
    """Scores in `question_ids` order; a question without a score becomes NaN (so the gate sees it)."""
    if scores is None:
        return None
    return np.array([scores.get(q, math.nan) for q in question_ids], dtype=np.float64)


# --- MLflow registry -------------------------------------------------------------------------------


def _client(cfg: Config):
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    check_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)




def weights_digest(model_uri: str) -> str:
    """One digest of a model directory's weights and tokenizer (its training state left out), from its stage
    manifest's file digests where it has one, else from the files themselves."""
    from arborl.components.artifacts import stage_keys

    manifest = manifests.read_manifest(model_uri)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        files = stage_keys.file_digests(model_uri)
    kept = {rel: meta["sha256"] for rel, meta in sorted(files.items())
            if rel.split("/")[0] not in model_files.TRAINING_STATE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def run_versions(client, name: str, run_id: str) -> list:
    """The versions of registered model `name` made from MLflow run `run_id`, oldest first."""
    found = client.search_model_versions(f"run_id='{run_id}'")
    return sorted((v for v in found if v.name == name and v.run_id == run_id), key=lambda v: int(v.version))


@contextlib.contextmanager
def _fluent_uri(cfg: Config, experiment_id: str | None = None):
    """Point MLflow's process-global (fluent) API at this run's store (and, given, its experiment, through
    $MLFLOW_EXPERIMENT_ID) for the block, then restore it: the transformers flavor's log_model and artifact
    downloads go through it, and mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI, which would leak into
    later runs of the same process."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    saved_uri = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)  # None also clears $MLFLOW_TRACKING_URI
        mlflow.set_registry_uri(saved_env["MLFLOW_REGISTRY_URI"])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def register_final_model(
    cfg: Config,
    run_id: str,
    model_uri: str,
    metrics: dict[str, float],
    extra_tags: dict[str, str] | None = None,
    alias: str = CHALLENGER,
) -> str:
    """Log the model directory at `model_uri` to run `run_id` with the transformers flavor, register it
    under `registry.model_name`, point `alias` (`challenger`) at it and tag it. Returns the version.

    Idempotent per run: a run that already registered a version (a resumed run, a rerun after a crash between
    registering and setting the alias) gets that version back. The model is logged in the run's own experiment,
    under its artifact location (a LoggedModel made here, so MLflow's process-wide default experiment and the
    working directory are never used).
    """
    import mlflow
    import torch
    import transformers

    from arborl.components.models import load_policy

    client = _client(cfg)
    name = cfg.registry.model_name
    digest = weights_digest(model_uri)
    # a version this run registered from these very weights (one whose tags were not written yet counts: a crash
    # between registering and tagging); other weights are another version
    existing = [v for v in run_versions(client, name, run_id) if v.tags.get(WEIGHTS_TAG, digest) == digest]
    if existing:
        version = str(existing[-1].version)
    else:
        # MLflow 3.17's local-checkpoint path (transformers_model=<dir>) fails on transformers 5 (its
        # pipeline registry stores class paths as strings), so the model is loaded once and logged as
        # components; the flavor then writes it with save_pretrained.
        model, tokenizer = load_policy(model_uri, "cpu", cfg.storage.cache_max_gb, cfg.model.dtype)
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        with _fluent_uri(cfg, experiment_id):
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name="model",
                model_id=logged.model_id,
                task="text-generation",
                run_id=run_id,
                registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                  f"transformers=={transformers.__version__}"],
            )
        version = str(info.registered_model_version)
        failpoint("registry.after_register")  # crash-safety tests: a kill between registering and the alias
    tags = {RUN_ID_TAG: run_id, CONFIG_HASH_TAG: cfg.section_hash(), MODEL_URI_TAG: model_uri,
            WEIGHTS_TAG: digest, **(extra_tags or {})}
    tags.update({f"eval.{k}": f"{v:.6g}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))})
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_registered_model_alias(name, alias, version)
    return version


def lineage_tags(cfg: Config, parent_version: str | None = None, parent_model_uri: str | None = None
                 ) -> dict[str, str]:
    """Where a model came from, as MLflow tags for its run and its registered version: the registered version it
    was trained from (`none`) and that model's URI (default: `model.path`, `none` for a fresh model), the data
    snapshot (`none` without data.snapshot_root), the data's URI and the config hash."""
    from arborl.components.data import snapshots

    return {
        PARENT_VERSION_TAG: parent_version or "none",
        PARENT_MODEL_URI_TAG: parent_model_uri or cfg.model.path or "none",
        DATA_SNAPSHOT_TAG: snapshots.snapshot_name(cfg.data),
        DATA_URI_TAG: snapshots.data_uri(cfg.data),
        CONFIG_HASH_TAG: cfg.section_hash(),
    }


def _experiment_id(client, cfg: Config) -> str:
    """The id of `tracking.experiment`, created (artifacts beside a local SQLite store, as the pipeline's
    tracker does) when missing."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri(cfg).startswith("sqlite:///") and storage.is_local(cfg.run.output_root):
        location = (Path(cfg.run.output_root).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)




def seed_champion(cfg: Config, model_uri: str) -> str:
    """Register the model directory `model_uri` (local, s3:// or a Hub id, as `models.load_policy` reads it) as a
    new version of `registry.model_name`, logged in its own MLflow run of `tracking.experiment`, tagged
    `arborl.origin=seed` with its lineage (parent `none`), and point `champion` at it. Returns the version.

    How a registry starts from a base model: `flows/deployments.py:retrain` then trains from the champion."""
    client = _client(cfg)
    name = cfg.registry.model_name
    # a seed is trained on no data of this project: no snapshot, no data URI
    tags = {ORIGIN_TAG: "seed", **lineage_tags(cfg, None, model_uri), DATA_SNAPSHOT_TAG: "none",
            DATA_URI_TAG: "none", MODEL_URI_TAG: model_uri}
    run = client.create_run(_experiment_id(client, cfg), run_name=f"seed-{name}", tags=tags)
    run_id = run.info.run_id
    try:
        version = register_final_model(cfg, run_id, model_uri, {}, tags, alias=CHAMPION)
        client.update_model_version(name, version, description=f"Seeded as {CHAMPION} from {model_uri}.")
        client.set_model_version_tag(name, version, "gate.champion_after", version)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return version


def champion_version(cfg: Config) -> str | None:
    """The version `champion` of `registry.model_name` points at, or None (no such alias or model yet)."""
    found = _alias(_client(cfg), cfg.registry.model_name, CHAMPION)
    return None if found is None else str(found.version)


def download_champion(cfg: Config, version: str, out: str) -> str:
    """The registered version `version` of `registry.model_name` as a plain Hugging Face model directory at
    `out` (local or remote); an existing complete copy (its `_source.json`, written last) is kept. Returns
    `out`."""
    name = cfg.registry.model_name
    source = {"model_uri": f"models:/{name}/{version}"}
    marker = storage.join(out, "_source.json")
    if storage.exists(marker) and storage.read_json(marker) == source:
        return out
    client = _client(cfg)
    with tempfile.TemporaryDirectory() as tmp, _fluent_uri(cfg):
        local = download_version(client, name, version, Path(tmp) / "download")
        storage.remove(out)
        if storage.is_local(out):
            shutil.copytree(local, storage.filesystem(out)[1])
        else:
            storage.upload_dir(local, out)
    storage.write_json(marker, source)
    return out


def _alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such alias (or model) yet
        return None


def download_version(client, name: str, version: str, dst: Path) -> Path:
    """Download a registered version and assemble a plain Hugging Face model directory from it
    (the flavor keeps weights under `model/` and the tokenizer under `components/tokenizer/`)."""
    import mlflow

    root = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst)))
    model_dir = root / "model"
    tokenizer_dir = root / "components" / "tokenizer"
    if tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, model_dir / f.name)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"registered model {name} v{version}: no model/config.json in its artifacts")
    return model_dir


@dataclass
class Promotion:
    """What `promote` did: the gate's decision, which versions took part and where the rows went."""

    decision: GateDecision
    model_name: str
    challenger_version: str
    baseline: str  # "champion v<N>" or "warm start"
    champion_before: str | None
    champion_after: str | None
    out: str | None

    def description(self, split: str = "") -> str:
        """The decision in one sentence with its numbers (the registered version's description)."""
        d = self.decision
        if d.decision == INCOMPLETE:
            return f"Not promoted: the gate against the {self.baseline} was incomplete ({d.reason})."
        questions = f"{d.n} {split} questions".replace("  ", " ")
        numbers = (f"{d.metric} {d.challenger:.3f} vs {d.baseline:.3f} for the {self.baseline} on {questions}, "
                   f"paired improvement {d.delta:+.3f} with 95% interval [{d.ci_low:+.3f}, {d.ci_high:+.3f}]")
        if d.promoted:
            return f"Promoted to {CHAMPION}: {numbers}, lower bound above the margin {d.margin:g}."
        why = "no improvement" if d.delta <= 0 else f"lower bound not above the margin {d.margin:g}"
        stays = f"{CHAMPION} stays v{self.champion_after}" if self.champion_after else f"no {CHAMPION} yet"
        return f"Not promoted ({stays}): {numbers}, {why}."

    def markdown(self) -> str:
        d = self.decision
        lines = [
            f"## Promotion of {self.model_name} v{self.challenger_version}: **{d.decision}**", "",
            f"{d.reason}", "",
            "| | value |", "|---|---|",
            f"| baseline | {self.baseline} |",
            f"| gate metric ({d.metric}), challenger | {d.challenger:.4f} |",
            f"| gate metric ({d.metric}), baseline | {d.baseline:.4f} |",
            f"| paired improvement | {d.delta:+.4f} |",
            f"| 95% bootstrap interval | [{d.ci_low:+.4f}, {d.ci_high:+.4f}] |",
            f"| margin | {d.margin} |",
            f"| questions | {d.n} |",
            f"| champion before → after | {self.champion_before or '-'} → {self.champion_after or '-'} |",
        ]
        return "\n".join(lines)


def promote(cfg: Config, split: str | None = None) -> Promotion:
    """Gate the `challenger` version against `champion` (or the warm start) and move `champion` on success."""
    from arborl.components.stages.evaluate import evaluate_model

    client = _client(cfg)
    name = cfg.registry.model_name
    split = split or cfg.registry.split
    challenger = _alias(client, name, CHALLENGER)
    if challenger is None:
        raise ValueError(f"registered model {name!r} has no {CHALLENGER!r} version: run the pipeline first")
    champion = _alias(client, name, CHAMPION)
    tags = challenger.tags
    challenger_version = str(challenger.version)
    champion_version = str(champion.version) if champion is not None else None
    world, run_root = tags.get(WORLD_TAG), tags.get(RUN_ROOT_TAG)
    if run_root and not storage.contains(cfg.run.output_root, run_root):
        raise ValueError(f"registered model {name!r} v{challenger.version}: its tag arborl.run_root={run_root!r} lies "
                         f"outside run.output_root={cfg.run.output_root!r}; nothing is written there")
    if champion_version == challenger_version:
        decision = GateDecision(REJECT, f"v{challenger_version} is already {CHAMPION}", cfg.registry.gate_metric,
                                cfg.registry.margin, 0)
        return Promotion(decision, name, challenger_version, "itself", champion_version, champion_version, None)

    question_ids: list[str] = []
    results: dict[str, tuple[list[dict] | None, str | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            question_ids = [p["prompt_id"] for p in load_prompts(world, split)] if world else []
            if not question_ids:
                raise ValueError(f"no {split} questions (world {world!r})")
            with _fluent_uri(cfg):
                sources = {"challenger": download_version(client, name, challenger_version,
                                                          Path(tmp) / "challenger")}
                if champion_version is not None:
                    sources["baseline"] = download_version(client, name, champion_version, Path(tmp) / "champion")
            if champion_version is None and tags.get(WARMSTART_MODEL_TAG):
                sources["baseline"] = tags[WARMSTART_MODEL_TAG]
            elif champion_version is None:
                raise ValueError(f"no {CHAMPION} and no warm-start model recorded on v{challenger_version}")
        except Exception as exc:  # nothing to compare: incomplete
            sources = {}
            results = {"challenger": (None, f"{type(exc).__name__}: {exc}")}
        for role, model_uri in sources.items():
            try:
                rows, _ = evaluate_model(cfg, str(model_uri), world, splits=(split,))
                results[role] = (rows, None)
            except Exception as exc:
                results[role] = (None, f"{role} evaluation failed: {type(exc).__name__}: {exc}")

    def scores(role: str) -> np.ndarray | None:
        rows = results.get(role, (None, None))[0]
        return None if rows is None else paired_scores(question_scores(rows, cfg.registry.gate_metric, split),
                                                       question_ids)

    decision = gate(scores("challenger"), scores("baseline"), cfg.registry.margin, cfg.registry.gate_metric,
                    expected=len(question_ids), resamples=cfg.evaluate.bootstrap, seed=cfg.run.seed)
    errors = [err for _, err in results.values() if err]
    if errors and decision.decision == INCOMPLETE:
        decision = GateDecision(**{**asdict(decision), "reason": "; ".join(errors)})
    baseline_label = f"{CHAMPION} v{champion_version}" if champion_version is not None else "warm start"

    out = None
    if run_root:
        out = storage.child(run_root, f"promote_v{challenger_version}")
        for role, (rows, _) in results.items():
            if rows is not None:
                schemas.write(rows, schemas.EVAL, storage.join(out, f"{role}_{schemas.EVAL_FILE}"))
        storage.write_json(storage.join(out, DECISION_FILE),
                           {**asdict(decision), "baseline": baseline_label, "split": split})
    champion_after = challenger_version if decision.promoted else champion_version
    result = Promotion(decision, name, challenger_version, baseline_label, champion_version, champion_after, out)
    # who was champion when: before and after this gate, and when it decided (for `arborl report`)
    history = {"gate.champion_before": champion_version or "-", "gate.champion_after": champion_after or "-",
               "gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for k, v in {**decision.tags(), "gate.baseline_model": baseline_label, "gate.split": split, **history}.items():
        client.set_model_version_tag(name, challenger_version, k, v)
    client.update_model_version(name, challenger_version, description=result.description(split))
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, challenger_version)
    return result


def version_tags(cfg: Config, version: str) -> dict[str, Any]:
    """The tags of one registered version (for reports and tests)."""
    return dict(_client(cfg).get_model_version(cfg.registry.model_name, version).tags)

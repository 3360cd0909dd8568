"""Names and links that tie a pipeline run together across Prefect and MLflow: the flow-run name (the run's
name), per-run artifact keys, the flow run's id and UI address, and the clean-up of a predecessor flow run
that a killed process left Running."""

from __future__ import annotations

import logging
import re

from arborl.components.config import Config
from arborl.components.tracking.tags import CONFIG_FILE_TAG, CONFIG_HASH_TAG

log = logging.getLogger("arborl.flows")
FLOW_NAME = "arborl-tree-grpo"  # the training flow's Prefect name


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from name parts: lowercase letters, digits and single dashes only
    (`artifact_key("tiny_v2", "summary")` → `tiny-v2-summary`)."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key or "arborl"


def flow_run_name() -> str:
    """The training flow run's name: the config's `run.name` (read from the flow run's parameters)."""
    from prefect.runtime import flow_run

    try:
        return Config.model_validate(flow_run.parameters.get("config") or {}).run.name
    except Exception:  # an invalid config fails in the flow itself, with the key named
        return "arborl"


def flow_run_links() -> dict[str, str]:
    """The current flow run as MLflow tags: `prefect.flow_run_id`, `prefect.flow_run_name` and, when a Prefect
    UI or API address is configured (not the temporary server of a single command), `prefect.flow_run_url`."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return {}
    run = context.flow_run
    tags = {"prefect.flow_run_id": str(run.id), "prefect.flow_run_name": run.name}
    ui = PREFECT_UI_URL.value()
    if ui and PREFECT_API_URL.value():
        tags["prefect.flow_run_url"] = f"{str(ui).rstrip('/')}/runs/flow-run/{run.id}"
    return tags


def mark_stale_runs(cfg: Config) -> list[str]:
    """Mark Crashed every other flow run of this training flow with this run's name and output root that the
    Prefect API still shows Running or Pending: its process is gone, since this one holds the run's lock.
    Returns their ids; failures to reach the API are logged, not raised."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext
    from prefect.states import Crashed

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return []
    me = context.flow_run.id
    marked: list[str] = []
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(not_any_=[me]), name=FlowRunFilterName(any_=[cfg.run.name]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING,
                                                                               StateType.PENDING]))))
            for run in runs:
                previous = (run.parameters.get("config") or {}).get("run") or {}
                if previous.get("output_root") != cfg.run.output_root:
                    continue  # a run of the same name under another output root
                client.set_flow_run_state(run.id, Crashed(
                    message=f"superseded by flow run {me} of run {cfg.run.name!r}: its process is gone"), force=True)
                log.warning("flow run %s (%s) of run %s was still %s; marked Crashed", run.name, run.id, cfg.run.name,
                            run.state.type.value if run.state else "unknown")
                marked.append(str(run.id))
    except Exception as exc:  # the dashboards must never fail the run
        log.warning("could not check for stale flow runs of %s: %s", cfg.run.name, exc)
    return marked


def mlflow_run_tags(cfg: Config, config_file: str | None) -> dict[str, str]:
    """What ties the MLflow run to its origin: the Prefect flow run (id, name, URL when known), the git commit
    of the working directory (when it is a git repository), the config file and the config's hash."""
    from arborl.components.tracking.store import git_commit

    tags = {**flow_run_links(), CONFIG_HASH_TAG: cfg.section_hash()}
    if config_file:
        tags[CONFIG_FILE_TAG] = str(config_file)
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags

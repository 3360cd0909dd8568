"""`arborl report`: the registered versions of the configured model, from what registration and the gated
promotion recorded in their tags (`arborl.*`, `eval.*`, `gate.*`), as rows, a terminal table and markdown."""

from __future__ import annotations

import math
import time
from typing import Any

from arborl.components.config import Config
from arborl.components.tracking.store import check_tracking_uri, model_version_url, run_url, tracking_uri
from arborl.components.tracking.tags import DATA_SNAPSHOT_TAG, ORIGIN_TAG, PARENT_VERSION_TAG, RUN_ID_TAG

COLUMNS = ("version", "created", "run", "lineage", "decision", "metric", "scores", "delta", "champion", "aliases")
MD_COLUMNS = (*COLUMNS[:6], "against", *COLUMNS[6:])  # markdown has room for the baseline's name too
HEADERS = {"version": "version", "created": "created (UTC)", "run": "MLflow run",
           "lineage": "data snapshot ← parent", "decision": "gate",
           "metric": "metric", "scores": "challenger vs baseline", "against": "baseline",
           "delta": "paired Δ [95% interval]", "champion": "champion before → after", "aliases": "aliases now"}
SHORT = {**HEADERS, "version": "ver", "created": "created", "run": "run", "scores": "score vs base",
         "delta": "Δ [95% CI]", "champion": "champion", "aliases": "aliases", "lineage": "data ← parent"}


def _float(value: str | None) -> float | None:
    try:
        x = float(value) if value is not None else None
    except ValueError:
        return None
    return None if x is None or math.isnan(x) else x


def _none(value: str | None) -> str | None:
    return None if value in (None, "", "none") else value


def registry_rows(cfg: Config) -> list[dict[str, Any]]:
    """One row per registered version of `registry.model_name`, oldest first (empty when it has none)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    check_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = cfg.registry.model_name
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException:  # no such model yet
        return []
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    rows = []
    for v in versions:
        tags = v.tags or {}
        run_id = tags.get(RUN_ID_TAG) or v.run_id
        run_name, experiment_id = None, None
        if run_id:
            try:
                info = client.get_run(run_id).info
                run_name, experiment_id = info.run_name, info.experiment_id
            except MlflowException:
                pass
        before, after = tags.get("gate.champion_before"), tags.get("gate.champion_after")
        rows.append({
            "version": str(v.version),
            "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.creation_timestamp / 1000)),
            "run_id": run_id, "run_name": run_name,
            "run_url": run_url(uri, experiment_id, run_id) if run_id and experiment_id else None,
            "url": model_version_url(uri, name, str(v.version)),
            "decision": tags.get("gate.decision"), "reason": tags.get("gate.reason"),
            "metric": tags.get("gate.metric"), "split": tags.get("gate.split"),
            "challenger": _float(tags.get("gate.challenger")), "baseline": _float(tags.get("gate.baseline")),
            "delta": _float(tags.get("gate.delta")), "ci_low": _float(tags.get("gate.ci_low")),
            "ci_high": _float(tags.get("gate.ci_high")), "n": tags.get("gate.n"),
            "against": tags.get("gate.baseline_model"), "decided_at": tags.get("gate.decided_at"),
            "champion_before": before, "champion_after": after,
            "data_snapshot": _none(tags.get(DATA_SNAPSHOT_TAG)),
            "parent_version": _none(tags.get(PARENT_VERSION_TAG)),
            "origin": tags.get(ORIGIN_TAG),
            "aliases": sorted(by_version.get(str(v.version), [])),
            "description": v.description or "",
        })
    return rows


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def cells(row: dict[str, Any]) -> dict[str, str]:
    """A row's table cells, as text."""
    champion = "-"
    if row["champion_after"] is not None:
        fmt = {None: "-", "-": "-"}
        champion = (f"{fmt.get(row['champion_before'], 'v' + str(row['champion_before']))} → "
                    f"{fmt.get(row['champion_after'], 'v' + str(row['champion_after']))}")
    ci = "" if row["ci_low"] is None else f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
    metric = "-" if not row["metric"] else f"{row['metric']} ({row['split'] or '?'}, n={row['n']})"
    scores = "-" if row["challenger"] is None else f"{_num(row['challenger'])} vs {_num(row['baseline'])}"
    parent = f"v{row['parent_version']}" if row["parent_version"] else "-"
    lineage = "seed" if row["origin"] == "seed" else f"{row['data_snapshot'] or 'synthetic'} ← {parent}"
    return {
        "version": f"v{row['version']}", "created": row["created"], "lineage": lineage,
        "run": f"{row['run_name'] or '-'} ({(row['run_id'] or '-')[:8]})", "decision": row["decision"] or "not gated",
        "metric": metric, "scores": scores, "delta": _num(row["delta"], signed=True) + ci,
        "against": row["against"] or "-", "champion": champion, "aliases": ", ".join(row["aliases"]) or "-",
    }


def markdown(model_name: str, rows: list[dict[str, Any]]) -> str:
    """The report as a markdown table (versions and runs linked when tracking is an http server)."""
    lines = [f"## Registered versions of {model_name}", ""]
    if not rows:
        return "\n".join([*lines, "No registered versions yet."])
    lines += ["| " + " | ".join(HEADERS[c] for c in MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    for row in rows:
        text = cells(row)
        if row["url"].startswith("http"):
            text["version"] = f"[{text['version']}]({row['url']})"
        if row["run_url"] and row["run_url"].startswith("http"):
            text["run"] = f"[{text['run']}]({row['run_url']})"
        lines.append("| " + " | ".join(text[c] for c in MD_COLUMNS) + " |")
    described = [f"* v{row['version']}: {row['description']}" for row in rows if row["description"]]
    return "\n".join([*lines, "", *described] if described else lines)


def rich_table(model_name: str, rows: list[dict[str, Any]]):
    """The report as a Rich table for the terminal."""
    from rich.table import Table

    table = Table(title=f"registered versions of {model_name}", caption="champion: before → after its gate")
    for c in COLUMNS:
        table.add_column(SHORT[c], no_wrap=c in ("version", "decision"), overflow="fold")
    for row in rows:
        text = cells(row)
        table.add_row(*(text[c] for c in COLUMNS))
    return table

"""Alerts: a Prefect event when the promotion gate rejects a challenger, and Prefect automations that post a
JSON notification to a webhook when an arborl flow run fails or crashes, or when a challenger is rejected.

Automations run on the Prefect server (its triggers and actions services), so `create_alerts` needs
`PREFECT_API_URL` pointing at a long-lived server (`prefect server start`), not the temporary server that a
single command starts and stops.
"""

from __future__ import annotations

import logging
import math
from typing import Any
from uuid import UUID

log = logging.getLogger("arborl.flows")

REJECTED_EVENT = "arborl.challenger.rejected"
FLOW_NAME_PATTERN = "arborl-*"  # every arborl flow (arborl-tree-grpo, arborl-sample-shards, arborl-compare)
FAILED_STATES = ("Failed", "Crashed")

# The webhook body: a JSON object the receiver can read without parsing prose.
WEBHOOK_JSON = {"title": "{{subject}}", "body": "{{body}}", "source": "{{name}}"}

FAILED_SUBJECT = "arborl: flow run {{ flow_run.name }} {{ flow_run.state.name }}"
FAILED_BODY = (
    "Flow run {{ flow_run.name }} of flow {{ flow.name }} entered state {{ flow_run.state.name }}"
    " at {{ event.occurred }}.\n"
    "State message: {{ flow_run.state.message }}\n"
    "Flow run id: {{ flow_run.id }}\n"
    "URL: {{ flow_run|ui_url }}"
)
REJECTED_SUBJECT = "arborl: challenger {{ event.resource.name }} rejected"
REJECTED_BODY = (
    "Challenger {{ event.resource.name }} was rejected by the promotion gate.\n"
    "Metric: {{ event.payload.metric }}\n"
    "Challenger: {{ event.payload.challenger }}\n"
    "Baseline: {{ event.payload.baseline }}\n"
    "Delta: {{ event.payload.delta }} (95% interval [{{ event.payload.ci_low }}, {{ event.payload.ci_high }}],"
    " n={{ event.payload.n }}, margin {{ event.payload.margin }})\n"
    "Reason: {{ event.payload.reason }}\n"
    "Event id: {{ event.id }}"
)


def _json_safe(value: Any) -> Any:
    """Event payloads are JSON: NaN and infinities (an incomplete decision) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _current_flow_run() -> dict[str, str] | None:
    """The current flow run as an event's related resource, or None outside a flow run."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    return {
        "prefect.resource.id": f"prefect.flow-run.{context.flow_run.id}",
        "prefect.resource.role": "flow-run",
        "prefect.resource.name": context.flow_run.name,
    }


def emit_challenger_rejected(model_name: str, version: str, decision: dict) -> None:
    """Emit the `arborl.challenger.rejected` Prefect event for registered model `model_name` version `version`,
    with the gate decision (metric, challenger/baseline values, delta, interval, reason) as payload and the
    current flow run, if any, as related resource. Never raises: a failure to emit is logged as a warning."""
    try:
        from prefect.events import emit_event

        related = [r for r in (_current_flow_run(),) if r is not None]
        emitted = emit_event(
            event=REJECTED_EVENT,
            resource={
                "prefect.resource.id": f"arborl.model.{model_name}.v{version}",
                "prefect.resource.name": f"{model_name} v{version}",
                "arborl.model.name": str(model_name),
                "arborl.model.version": str(version),
            },
            payload=_json_safe(dict(decision)),
            related=related,
        )
        if emitted is None:
            log.debug("event %s not emitted (events are off or no Prefect API is reachable)", REJECTED_EVENT)
    except Exception as exc:  # an alert must never fail the promotion it reports on
        log.warning("could not emit the %s event for %s v%s: %s", REJECTED_EVENT, model_name, version, exc)


def _upsert_block(block_name: str, webhook_url: str) -> UUID:
    """Create or overwrite the Custom Webhook notification block `block_name` posting JSON to `webhook_url`;
    returns its block document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(name=block_name, url=webhook_url, method="POST", json_data=WEBHOOK_JSON)
    return block.save(block_name, overwrite=True)


def _upsert_automation(automation: Any) -> str:
    """Create `automation`, or update the one of the same name in place; returns what was done."""
    from prefect.automations import Automation

    try:
        existing = Automation.read(name=automation.name)
    except ValueError:
        existing = None
    if existing is None:
        automation.create()
        return f"created automation {automation.name!r} ({automation.id})"
    automation.id = existing.id
    automation.update()
    return f"updated automation {automation.name!r} ({automation.id})"


def create_alerts(
    webhook_url: str, prefix: str = "arborl", flow_name_pattern: str = FLOW_NAME_PATTERN
) -> list[str]:
    """Idempotently create (or update) the webhook notification block `<prefix>-webhook` and two automations
    on the Prefect server at `PREFECT_API_URL`:

    * `<prefix>-flow-run-failed`: a flow run of a flow named `flow_name_pattern` (a trailing `*` is a wildcard;
      default every arborl flow) enters Failed or Crashed → notification naming the flow run, state and URL;
    * `<prefix>-challenger-rejected`: the `arborl.challenger.rejected` event → notification with the decision.

    Returns one line per block/automation saying what was created or updated.
    """
    if not webhook_url.startswith(("http://", "https://")):
        raise ValueError(f"webhook URL must start with http:// or https://, got {webhook_url!r}")
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block_name = f"{prefix}-webhook"
    block_id = _upsert_block(block_name, webhook_url)
    done = [f"saved notification block {block_name!r} ({block_id}) posting JSON to {webhook_url}"]

    failed = Automation(
        name=f"{prefix}-flow-run-failed",
        description=f"Notify {block_name} when a flow run of {flow_name_pattern} fails or crashes.",
        trigger=EventTrigger(
            expect={f"prefect.flow-run.{state}" for state in FAILED_STATES},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": flow_name_pattern},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT,
                                  body=FAILED_BODY)],
    )
    rejected = Automation(
        name=f"{prefix}-challenger-rejected",
        description=f"Notify {block_name} when the promotion gate rejects a challenger.",
        trigger=EventTrigger(
            expect={REJECTED_EVENT},
            match={"prefect.resource.id": "arborl.model.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=REJECTED_SUBJECT,
                                  body=REJECTED_BODY)],
    )
    done += [_upsert_automation(failed), _upsert_automation(rejected)]
    return done

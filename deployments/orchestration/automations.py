"""The service's Prefect automations, declared in `deployments/automations.yaml` (Prefect's own
format), and the notification block failures are sent through."""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Any

import yaml

from tasks.cells import CELL_FLOW_NAME

AUTOMATIONS = Path(__file__).resolve().parents[1] / "automations.yaml"
NOTIFY_BLOCK = "textgen-failures"
NOTIFY_AUTOMATION = "textgen: notify on failed or crashed runs"


def automations(zombie_seconds: float, notify_block_id: str | None, mlflow_ui: str) -> list[Any]:
    """The automations declared in `automations.yaml`, filled in; the notification one only
    when there is a block to notify through."""
    from prefect.automations import AutomationCore

    text = Template(AUTOMATIONS.read_text()).safe_substitute(
        ZOMBIE_SECONDS=str(int(zombie_seconds)),
        NOTIFY_BLOCK_ID=notify_block_id or "",
        MLFLOW_UI=mlflow_ui,
        CELL_FLOW=CELL_FLOW_NAME,
    )
    return [
        AutomationCore.model_validate(item)
        for item in yaml.safe_load(text)["automations"]
        if notify_block_id or not any(a["type"] == "send-notification" for a in item["actions"])
    ]


def save_notify_block(url: str) -> str:
    """The webhook notification block failures are sent through; returns its document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name="textgen",
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
        timeout=10,
        headers=None,
        cookies=None,
    )
    return str(block.save(NOTIFY_BLOCK, overwrite=True))


def apply_automations(
    client: Any, zombie_seconds: float, notify_url: str | None, mlflow_ui: str
) -> None:
    """Create the automations, replacing those of the same names; a notification set up
    before is dropped when no URL is given now."""
    block_id = save_notify_block(notify_url) if notify_url else None
    wanted = automations(zombie_seconds, block_id, mlflow_ui)
    names = {a.name for a in wanted} | {NOTIFY_AUTOMATION}
    for existing in client.read_automations():
        if existing.name in names:
            client.delete_automation(existing.id)
    for automation in wanted:
        client.create_automation(automation)

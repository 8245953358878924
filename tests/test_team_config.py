"""What the team service declares: its automations, and compose.yaml's topology."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from deployments.cli import parse_command
from deployments.ops.prefect_server import SERVER_SETTINGS
from deployments.ops.team import POOL
from deployments.orchestration.automations import AUTOMATIONS, automations
from tasks.errors import ServeError

PROJECT = Path(__file__).resolve().parents[1]
COMPOSE = PROJECT / "deployments" / "compose.yaml"


def test_the_declared_automations_are_valid_prefect_automations() -> None:
    block = "5d2f8a52-1c4e-4a8e-9b3a-0c8e7f6d5a41"
    found = automations(45, block, "http://mlflow.example:5000")
    assert [a.name for a in found] == [
        "textgen: crash runs whose worker stopped",
        "textgen: notify on failed or crashed runs",
    ]
    zombie, notify = found
    assert zombie.trigger.posture.value == "Proactive"  # type: ignore[union-attr]
    assert zombie.trigger.within.total_seconds() == 45  # type: ignore[union-attr]
    assert zombie.actions[0].type == "change-flow-run-state"
    action = notify.actions[0]
    assert str(action.block_document_id) == block  # type: ignore[union-attr]
    body = action.body  # type: ignore[union-attr]
    for needed in (
        "parameters.repo_url",
        "commit_sha",
        "state.message",
        "ui_url",
        "mlflow_run_url",
    ):
        assert needed in body
    assert "http://mlflow.example:5000" in body
    # Without a webhook to notify, only the crash detection is set up.
    assert [a.name for a in automations(90, None, "")] == [
        "textgen: crash runs whose worker stopped"
    ]
    assert "${" not in AUTOMATIONS.read_text().split("automations:", 1)[1].replace(
        "${ZOMBIE_SECONDS}", ""
    ).replace("${NOTIFY_BLOCK_ID}", "").replace("${MLFLOW_UI}", "").replace("${CELL_FLOW}", "")


def _state_event(flow: str, tags: list[str]) -> tuple[object, list[object]]:
    """A flow run's Failed event's resource and related resources, as Prefect's server emits
    them (`prefect.server.models.events`)."""
    from prefect.server.events.schemas.events import RelatedResource, Resource

    run = Resource.model_validate({"prefect.resource.id": "prefect.flow-run.1"})
    related = [
        RelatedResource.model_validate(
            {
                "prefect.resource.id": "prefect.flow.2",
                "prefect.resource.name": flow,
                "prefect.resource.role": "flow",
            }
        ),
        RelatedResource.model_validate(
            {
                "prefect.resource.id": "prefect.deployment.3",
                "prefect.resource.name": "alpha",
                "prefect.resource.role": "deployment",
            }
        ),
        *(
            RelatedResource.model_validate(
                {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
            )
            for tag in tags
        ),
    ]
    return run, related


def test_failures_notify_once_per_push_not_once_per_matrix_cell() -> None:
    """A failed cell fails its version's run with the cell's reason: only the version's run
    is notified, judged by Prefect's own trigger matching."""
    from prefect.server.events.schemas.automations import EventTrigger

    from tasks.cells import CELL_FLOW_NAME
    from tasks.names import FLOW_NAME

    notify = automations(45, "5d2f8a52-1c4e-4a8e-9b3a-0c8e7f6d5a41", "")[1]
    trigger = EventTrigger.model_validate(notify.trigger.model_dump(mode="json"))
    assert trigger.covers_resources(*_state_event(FLOW_NAME, ["textgen", "on-push"]))
    assert not trigger.covers_resources(*_state_event(CELL_FLOW_NAME, ["textgen", "cells"]))
    # Runs that are not the project's are not notified either.
    assert not trigger.covers_resources(*_state_event(FLOW_NAME, ["other"]))


def _command(service: dict[str, object]) -> list[str]:
    command = service["command"]
    assert isinstance(command, str)
    words = shlex.split(command)
    if words[:2] == ["sh", "-c"]:
        words = shlex.split(words[2].split(" exec ", 1)[1])
    return words


def test_compose_runs_the_topology_the_tests_start() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "prefect", "mlflow", "setup", "receiver", "worker"}
    assert services["postgres"]["image"] == "postgres:15"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")

    prefect = services["prefect"]
    assert _command(prefect)[:3] == ["prefect", "server", "start"]
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://textgen@postgres:5432/prefect"
    )
    # The settings every Prefect server of the project has (leases on disk among them).
    assert SERVER_SETTINGS.items() <= prefect["environment"].items()
    mlflow = _command(services["mlflow"])
    assert mlflow[:2] == ["mlflow", "server"]
    store = mlflow[mlflow.index("--backend-store-uri") + 1]
    assert store.startswith("postgresql+psycopg2://textgen@postgres:5432/mlflow")
    assert "--artifacts-destination" in mlflow
    sql = (PROJECT / "deployments" / "compose" / "create-mlflow-db.sql").read_text()
    assert "CREATE DATABASE mlflow" in sql

    # The textgen commands are ones the CLI takes.
    setup = _command(services["setup"])
    receiver = _command(services["receiver"])
    for words in (setup, receiver):
        assert words[0] == "textgen"
        assert parse_command(words[1:])  # a command textgen takes, with options it knows
    assert setup[1:3] == ["team", "apply"]
    assert receiver[1] == "receive" and "--reap" in receiver and "--links" in receiver

    worker = services["worker"]
    words = _command(worker)
    assert words[:3] == ["prefect", "worker", "start"]
    assert words[words.index("--pool") + 1] == POOL
    # Scalable: no fixed name or port, and a data folder of its own in each replica.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["volumes"] == ["/data"] and worker["environment"]["TEXTGEN_HOME"] == "/data"
    # Clients reach the servers by service name; nobody holds a password in the file.
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert not re.search(r"postgresql[^\s]*:[^@\s/]+@", COMPOSE.read_text())


def test_the_image_installs_what_the_bootstrap_installs() -> None:
    dockerfile = (PROJECT / "deployments" / "Dockerfile").read_text()
    bootstrap = (PROJECT / "deployments" / "bootstrap.sh").read_text()
    torch = re.search(r"torch==[\d.]+", bootstrap)
    assert torch and torch.group(0) in dockerfile
    assert '".[gguf,team]"' in dockerfile and '".[gguf,team]"' in bootstrap
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["x-textgen"]["build"]["dockerfile"] == "deployments/Dockerfile"


def test_compose_and_the_supervised_topology_have_the_same_policies(tmp_path: Path) -> None:
    """What restarts, what is waited on to be healthy, and in which order: the same in
    compose.yaml and in the supervisord configuration `team up` runs."""
    import configparser

    from deployments.ops.team import SERVERS, WORKER_TYPE, Team
    from deployments.service.worker import WarmWorker

    pytest.importorskip("supervisor")
    team = Team(tmp_path / "home", tmp_path / "links.yaml", workers=2)
    try:
        programs = team.programs()
    except ServeError as exc:  # no PostgreSQL on this machine: its command cannot be named
        pytest.skip(str(exc))
    team.supervisor.write(programs)
    conf = configparser.RawConfigParser()
    conf.read(team.supervisor.conf)
    sections = {
        s.removeprefix("program:"): conf[s] for s in conf.sections() if s.startswith("program:")
    }
    assert set(sections) == {*SERVERS.values(), "worker-0", "worker-1"}
    for name, section in sections.items():
        # Started in order by `team up`, then restarted whenever it dies, its group with it.
        assert section["autostart"] == "false" and section["autorestart"] == "true", name
        assert section["stopasgroup"] == section["killasgroup"] == "true", name
    order = {name: int(section["priority"]) for name, section in sections.items()}
    assert order["postgres"] < order["prefect-server"] == order["mlflow-server"]
    assert order["mlflow-server"] < order["receiver"] < order["worker-0"] == order["worker-1"]
    # No secret in the file supervisord reads: environments are files of their own (0600).
    assert "PGPASSWORD" not in team.supervisor.conf.read_text()
    for env_file in (team.home / "env").iterdir():
        assert env_file.stat().st_mode & 0o077 == 0, env_file

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["setup"]["restart"] == "no"
    for service in ("postgres", "prefect", "mlflow", "receiver", "worker"):
        assert services[service]["restart"] == "unless-stopped", service  # (merged anchors)
    # Waited on to be healthy: the servers and the receiver, as `team up` waits on them.
    for service in ("postgres", "prefect", "mlflow", "receiver"):
        assert "healthcheck" in services[service], service
    needs = {name: set(services[name].get("depends_on", {})) for name in services}
    assert needs["prefect"] == needs["mlflow"] == {"postgres"}
    assert needs["setup"] == {"prefect", "mlflow"} and needs["receiver"] == {"setup"}
    assert needs["worker"] == {"setup", "receiver"}
    # The same worker type everywhere.
    assert WarmWorker.type == WORKER_TYPE
    assert _command(services["worker"])[_command(services["worker"]).index("--type") + 1] == (
        WORKER_TYPE
    )


@pytest.mark.slow
def test_a_run_left_pending_by_a_dead_worker_is_crashed_by_the_zombie_automation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed as it starts a run leaves the run Pending, holding its deployment's
    slot: the automation, on a real Prefect server, crashes it; a run that goes on to Running
    and ends is left alone."""
    import time

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending, Running

    from deployments.orchestration.automations import apply_automations
    from tests.servers import PrefectServer, wait_for

    server = PrefectServer(tmp_path / "prefect")
    server.start()
    try:
        monkeypatch.setenv("PREFECT_API_URL", server.api_url)

        @flow(name="zombie-target")
        def target() -> None:
            pass

        with get_client(sync_client=True) as client:
            apply_automations(client, 10, None, "")
            deployment = client.create_deployment(
                client.create_flow(target), "zombies", tags=["textgen"]
            )
            stuck = client.create_flow_run_from_deployment(deployment)
            moving = client.create_flow_run_from_deployment(deployment)
            client.set_flow_run_state(stuck.id, Pending())
            client.set_flow_run_state(moving.id, Pending())
            time.sleep(2)
            client.set_flow_run_state(moving.id, Running())
            time.sleep(2)
            client.set_flow_run_state(moving.id, Completed())
            ended = time.monotonic()

            def state(run: object) -> object:
                return client.read_flow_run(run.id).state  # type: ignore[attr-defined]

            wait_for(lambda: state(stuck).type.value == "CRASHED", 90, "the Pending run Crashed")  # type: ignore[attr-defined]
            assert "not Running after Pending" in state(stuck).message  # type: ignore[attr-defined]
            # Past the automation's 10 s and the server's 5 s proactive pass.
            time.sleep(max(0.0, ended + 16 - time.monotonic()))
            assert state(moving).type.value == "COMPLETED"  # type: ignore[attr-defined]
    finally:
        server.stop()

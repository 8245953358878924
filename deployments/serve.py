"""`textgen serve`: the on-push deployment, its runner and the push receiver in one process.

When `PREFECT_API_URL` is unset it also starts and supervises a local `prefect server start`
with its data in the project's data folder, and stops it on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

from deployments.receiver import (
    EVENT_NAME,
    PULL_REQUEST_EVENT,
    Emitter,
    Outbox,
    Poller,
    Receiver,
    Served,
    start_http,
)
from tasks.config import data_dir, forget_service, record_service, tracking_uri
from tasks.errors import SettingsError, TextgenError
from tasks.links import resolve_ref
from tasks.repo import RepoLocation
from tasks.triggers import SUPERSEDED

logger = logging.getLogger(__name__)

FLOW_NAME = "nlp-text-generation"
DEFAULT_DEPLOYMENT = "on-push"
AUTOMATIC = ("push", "poll")
SECRET_ENV = frozenset({"TEXTGEN_GIT_CREDENTIALS", "TEXTGEN_WEBHOOK_SECRET"})


class ServeError(TextgenError):
    """The service cannot start as asked."""

    exit_code = 6


def prefect_home() -> Path:
    """Where the embedded Prefect server keeps its database and logs."""
    return data_dir() / "prefect"


def server_file() -> Path:
    """Written while `textgen serve` supervises a local Prefect server: its URL and pid."""
    return prefect_home() / "server.json"


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether `api_url/health` answers 200."""
    try:
        with urlopen(f"{api_url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (URLError, OSError, ValueError):
        return False


def _recorded_server(home: Path) -> tuple[int, str] | None:
    """The pid and API URL of the local server recorded in `home`, if it is up and healthy."""
    try:
        info = json.loads((home / "server.json").read_text())
        pid, url = int(info["pid"]), str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, url) if _is_prefect_server(pid) and healthy(url) else None


def running_local_server() -> str | None:
    """The API URL of a local server that `textgen serve` supervises, if one is up."""
    found = _recorded_server(prefect_home())
    return None if found is None else found[1]


def _is_prefect_server(pid: int) -> bool:
    """Whether `pid` is (still) a `prefect server start` process, not a reused pid."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"prefect" in command and b"server" in command and b"start" in command


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise ServeError("no free local port for the Prefect server")


class LocalPrefectServer:
    """A `prefect server start` child process on 127.0.0.1, restarted if it dies.

    Its data (SQLite database, log, and `server.json` while it runs) live in `home`.
    """

    def __init__(self, port: int = 4200, home: Path | None = None) -> None:
        self.home = home or prefect_home()
        self.port = _free_port(port)
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.stopping = threading.Event()  # a new one for each start

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, less the secrets it never needs (git credentials,
        the webhook secret), with its home and URL."""
        return {
            **{k: v for k, v in os.environ.items() if k not in SECRET_ENV},
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": self.url,
        }

    def _spawn(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 - handed to the child
        command = [sys.executable, "-m", "prefect", "server", "start"]
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches us; we stop the server in order
        )
        log.close()

    def healthy(self) -> bool:
        """Whether the API answers its health check."""
        return healthy(self.url)

    def _adopt(self) -> bool:
        """Take over a server an earlier service of this data folder started and left running
        (it was killed): the same process, port and data, rather than a second server."""
        found = _recorded_server(self.home)
        if found is None:
            return False
        self.pid, self.url = found
        self.port = int(self.url.rsplit(":", 1)[1].split("/", 1)[0])
        logger.info("Prefect server of an earlier service still runs (pid %d); using it", self.pid)
        return True

    def _record(self) -> None:
        (self.home / "server.json").write_text(json.dumps({"url": self.url, "pid": self.pid}))

    def start(self, timeout: float = 120.0, adopt: bool = False) -> None:
        """Start the server (again, on the same port and data) and wait until it answers.

        With `adopt`, a server left running by an earlier service of this data folder is used
        instead of starting a second one.
        """
        self.stopping = threading.Event()
        if not (adopt and self._adopt()):
            self._spawn()
            deadline = time.monotonic() + timeout
            while not self.healthy():
                assert self.process is not None
                if self.process.poll() is not None:
                    raise ServeError(
                        f"prefect server exited with code {self.process.returncode}; "
                        f"see {self.home / 'server.log'}"
                    )
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServeError(
                        f"prefect server did not answer on {self.url} within {timeout:.0f} s"
                    )
                time.sleep(0.5)
            assert self.process is not None
            self.pid = self.process.pid
        self._record()
        threading.Thread(
            target=self._supervise, args=(self.stopping,), name="prefect-server-watch", daemon=True
        ).start()
        logger.info("Prefect server on %s (UI: http://127.0.0.1:%d)", self.url, self.port)

    def _alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _is_prefect_server(self.pid)

    def _supervise(self, stopping: threading.Event) -> None:
        while not stopping.wait(2.0):
            if self.pid and not self._alive():
                logger.warning("Prefect server (pid %d) exited; restarting it", self.pid)
                self._spawn()
                assert self.process is not None
                self.pid = self.process.pid
                with contextlib.suppress(OSError):
                    self._record()

    def stop(self) -> None:
        """Stop the server we started or adopted (by its pid), then forget it."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            (self.home / "server.json").unlink()
        process, pid = self.process, self.pid
        self.process, self.pid = None, 0
        if process is not None:
            stop_group(process)
        elif pid and _is_prefect_server(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _is_prefect_server(pid):
                time.sleep(0.2)
            if _is_prefect_server(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def stop_group(process: subprocess.Popen[bytes], grace: float = 20) -> None:
    """End a child started in a session of its own, and its children: SIGTERM to the group,
    SIGKILL after `grace` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def use_api_url(url: str | None) -> None:
    """Point this process (and the processes it starts) at a Prefect API, or at none."""
    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    # Prefect reads its settings when imported; take the change into its global context.
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


@contextlib.contextmanager
def prefect_api(port: int = 4200) -> Iterator[str]:
    """`PREFECT_API_URL` when set; else a local server started (and stopped) here."""
    explicit = os.environ.get("PREFECT_API_URL")
    if explicit:
        yield explicit
        return
    server = LocalPrefectServer(port)
    server.start(adopt=True)
    use_api_url(server.url)
    try:
        yield server.url
    finally:
        use_api_url(None)
        server.stop()


def _event_trigger(
    event: str, name: str, repo_url: str, branch: str, parameters: dict[str, str]
) -> Any:
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=name,
        expect={event},
        match={
            "prefect.resource.id": "git.repo.*",
            "git.repository": repo_url,
            "git.branch": branch,
        },
        parameters=parameters,
    )


def push_trigger(repo_url: str, branch: str) -> Any:
    """The deployment trigger: a `git.push` event for this repository and branch."""
    return _event_trigger(
        EVENT_NAME,
        f"{EVENT_NAME} to {branch}",
        repo_url,
        branch,
        {
            "commit_sha": "{{ event.payload.after }}",
            "before": "{{ event.payload.before }}",
            "changed_paths": "{{ event.payload.changed_paths }}",
            "trigger": "{{ event.payload.trigger }}",
        },
    )


def preview_trigger(repo_url: str, branch: str) -> Any:
    """The deployment trigger of previews: a `git.pull_request` event for a pull request into
    this branch of this repository."""
    return _event_trigger(
        PULL_REQUEST_EVENT,
        f"{PULL_REQUEST_EVENT} into {branch}",
        repo_url,
        branch,
        {
            "commit_sha": "{{ event.payload.after }}",
            "trigger": "preview",
            "pull_request": "{{ event.payload.pull_request }}",
        },
    )


def triggers(repo_url: str, branch: str) -> list[Any]:
    """Every trigger of a link's deployment: its pushes and its pull requests' previews."""
    return [push_trigger(repo_url, branch), preview_trigger(repo_url, branch)]


def supersede_queued_runs(deployment_id: Any, newest_sha: str) -> int:
    """Mark queued push/poll runs of a deployment Superseded by the newest push, `newest_sha`.

    Runs not yet started whose commit is not `newest_sha` are Cancelled, the message starting
    `Superseded:` and naming the newer commit, and renamed after their commit: the newest
    push's run (queued now or soon) runs instead. Manual runs are never touched. Returns how
    many were marked.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
            limit=200,
        )
        marked = 0
        for run in runs:
            if run.parameters.get("trigger") not in AUTOMATIC:
                continue
            if str(run.parameters.get("commit_sha") or "").lower() == newest_sha:
                continue
            commit = str(run.parameters.get("commit_sha") or "")
            client.set_flow_run_state(
                run.id,
                Cancelled(
                    message=f"{SUPERSEDED}: by the newer push of {newest_sha[:7]}, which runs "
                    "instead"
                ),
                force=True,
            )
            # Named after its commit, as the runs that start are (a queued run has the name
            # Prefect gave it, and a superseded one never starts).
            with contextlib.suppress(Exception):
                client.update_flow_run(
                    run.id, name=f"{run.parameters.get('trigger', 'push')}-{commit[:12]}"
                )
            marked += 1
        if marked:
            logger.info("Marked %d queued run(s) superseded by %s", marked, newest_sha[:7])
        return marked


def recover_after_restart(deployment_id: Any, repo_url: str) -> int:
    """End the runs a killed service left behind, before its runner starts again.

    A flow run of the deployment still Pending, Running or Cancelling in Prefect has no process
    now unless one outlived the service (then its MLflow run names a live process on this
    machine, and it is left to finish). The others are set Crashed with the reason, which
    releases the deployment's concurrency slot, and their MLflow runs end FAILED (or are
    published, when they had taken their version number). Returns how many were ended.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from tasks.tracking import Tracker, process_gone

    tracker = Tracker.for_repo(repo_url)
    reason = "its process ended with the service that ran it (textgen serve restarted)"
    ended = 0
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(
                        any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
                    )
                )
            ),
            limit=200,
        )
        for run in runs:
            tracked = tracker.client.search_runs(
                [tracker.experiment_id],
                f"tags.`textgen.prefect.flow_run_id` = '{run.id}'",
                max_results=5,
            )
            alive = [
                r
                for r in tracked
                if r.info.status == "RUNNING" and process_gone(r.data.tags) is None
            ]
            if alive:
                logger.info("Flow run %s outlived the service; leaving it to finish", run.name)
                continue
            client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
            for r in tracked:
                if r.info.status == "RUNNING":
                    tracker.recover(r, reason)
            logger.warning("Flow run %s was left behind: %s; marked it Crashed", run.name, reason)
            ended += 1
    ended += tracker.recover_dead_runs()
    return ended


@dataclass(frozen=True)
class Watched:
    """A served link's deployment, whose queued runs the janitor and the reaper look after."""

    deployment_id: Any
    repo: RepoLocation
    branch: str


class Janitor(threading.Thread):
    """Keeps at most one queued automatic run per deployment: the newest push's."""

    def __init__(self, watched: list[Watched], outbox: Outbox, seconds: float = 1.0) -> None:
        super().__init__(name="textgen-janitor", daemon=True)
        self.watched = watched
        self.outbox = outbox
        self.seconds = seconds
        self.stopping = threading.Event()
        self.wake = threading.Event()

    def run(self) -> None:
        """Check after each emitted push and every `seconds`."""
        while not self.stopping.is_set():
            for item in self.watched:
                try:
                    start_missing_runs(item, self.outbox)
                except Exception as exc:
                    logger.debug("checking for missing runs failed: %s", exc)
                newest = self.outbox.latest(item.repo, item.branch)
                if newest:
                    try:
                        supersede_queued_runs(item.deployment_id, newest)
                    except Exception as exc:
                        logger.debug("superseding queued runs failed: %s", exc)
            self.wake.wait(self.seconds)
            self.wake.clear()


RUN_GRACE_SECONDS = 30.0
"""How long after Prefect took a push event its deployment trigger has to start a run."""


def start_missing_runs(item: Watched, outbox: Outbox, grace: float = RUN_GRACE_SECONDS) -> int:
    """Start the runs Prefect's trigger did not: a push event the API took (2xx) whose flow run
    never appeared. The outbox keeps each event until a run of its commit is seen, and starts
    one itself after `grace` seconds, with the parameters the trigger would have given. Runs of
    older pushes are then superseded as usual. Returns how many runs were started."""
    pending = outbox.without_run(item.repo, item.branch, grace)
    if not pending:
        return 0
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    started = 0
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[item.deployment_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=200,
        )
        seen = {str(r.parameters.get("commit_sha") or "").lower() for r in runs}
        for provider, delivery, event in pending:
            payload = event["payload"]
            if payload["after"] not in seen:
                client.create_flow_run_from_deployment(
                    item.deployment_id,
                    parameters={
                        "commit_sha": payload["after"],
                        "before": payload.get("before"),
                        "changed_paths": payload.get("changed_paths"),
                        "trigger": payload.get("trigger", "push"),
                    },
                    tags=["textgen-recovered-event"],
                )
                seen.add(payload["after"])
                started += 1
                logger.warning(
                    "Prefect took the push event for %s (delivery %s) but its trigger started no "
                    "run within %.0f s; started it",
                    payload["after"][:7],
                    delivery,
                    grace,
                )
            outbox.run_seen(provider, delivery)
    return started


RETRIED_TAG = "textgen-retried"


def retry_crashed_runs(item: Watched, newest: str | None) -> int:
    """Start a crashed push run once more (on whichever worker takes it), when its commit is
    still the branch's newest push; a newer push runs instead otherwise. Each crashed run is
    retried at most once, and a retry that crashes too is not retried again. Returns how many
    runs were started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    started = 0
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[item.deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
            ),
            limit=50,
        )
        for run in crashed:
            if RETRIED_TAG in run.tags or run.parameters.get("trigger") not in AUTOMATIC:
                continue
            # Marked first: a reaper that dies here loses a retry, never doubles one.
            client.update_flow_run(run.id, tags=[*run.tags, RETRIED_TAG])
            sha = str(run.parameters.get("commit_sha") or "").lower()
            if run.parameters.get("attempt", 1) >= 2 or (newest and sha != newest):
                continue
            client.create_flow_run_from_deployment(
                item.deployment_id,
                parameters={**run.parameters, "attempt": 2},
                tags=[*(t for t in run.tags if t != RETRIED_TAG), "retry"],
            )
            logger.warning(
                "Flow run %s of %s crashed (%s); started it once more",
                run.name,
                sha[:7],
                run.state.message if run.state else "",
            )
            started += 1
    return started


class Reaper(threading.Thread):
    """Ends what dead workers left: MLflow runs of crashed flow runs end FAILED with the reason
    (or are published, when they held their number), and crashed push runs run once more.

    Prefect itself marks a run whose worker died Crashed (the heartbeat automation), which frees
    its deployment's slot; this thread does the rest, from the receiver's machine.
    """

    def __init__(self, watched: list[Watched], outbox: Outbox, seconds: float = 5.0) -> None:
        super().__init__(name="textgen-reaper", daemon=True)
        self.watched = watched
        self.outbox = outbox
        self.seconds = seconds
        self.stopping = threading.Event()

    def run(self) -> None:
        """Check every `seconds`."""
        while not self.stopping.wait(self.seconds):
            self.check()

    def check(self) -> None:
        """One pass over every watched deployment."""
        from tasks.tracking import Tracker

        for item in self.watched:
            try:
                retry_crashed_runs(item, self.outbox.latest(item.repo, item.branch))
            except Exception as exc:
                logger.debug("retrying crashed runs failed: %s", exc)
            try:
                Tracker.for_repo(item.repo.url, create=False).recover_dead_runs()
            except Exception as exc:
                logger.debug("recovering runs of %s failed: %s", item.repo.url, exc)


def read_secret(secret_file: str | None, insecure: bool) -> bytes | None:
    """The webhook secret from `--secret-file` or `TEXTGEN_WEBHOOK_SECRET`; none means refuse."""
    if secret_file:
        try:
            return resolve_ref(f"file:{secret_file}", "--secret-file").encode()
        except SettingsError as exc:
            raise ServeError(str(exc)) from None
    value = os.environ.get("TEXTGEN_WEBHOOK_SECRET", "").strip()
    if value:
        return value.encode()
    if insecure:
        logger.warning(
            "Accepting unsigned webhooks (--insecure): anyone who reaches the port can start runs"
        )
        return None
    raise ServeError(
        "no webhook secret: set TEXTGEN_WEBHOOK_SECRET or pass --secret-file FILE "
        "(or --insecure to accept unsigned deliveries, for a receiver only this machine can reach)"
    )


def receiver_outbox(targets: list[Served]) -> Outbox:
    """The outbox of the served repositories, in the data folder: one per repository and
    branch for a single one, one for a list of links."""
    if len(targets) == 1 and targets[0].name == targets[0].repo.key:
        only = targets[0]
        name = f"{only.repo.key}-{only.branch.replace('/', '_')}"
    else:
        name = "links"
    return Outbox(data_dir() / "receiver" / f"{name}.sqlite")


def start_receiver(
    targets: list[Served],
    host: str,
    port: int,
    poll: dict[str, float] | None = None,
    deployments: dict[str, Any] | None = None,
    reap: bool = False,
) -> tuple[Any, list[Any]]:
    """Outbox, HTTP endpoint, emitter, janitor, pollers (and the reaper), in background threads.

    `poll` gives the poll interval of the targets to poll, `deployments` the deployment id of
    each target (by name) whose queued runs newer pushes supersede. Returns the HTTP server and
    the threads (each has a `stopping` event).
    """
    outbox = receiver_outbox(targets)
    receiver = Receiver.for_links(targets, outbox)
    try:
        http = start_http(receiver, host, port)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc}") from None
    for target in targets:
        try:
            Poller(target.repo, target.branch, outbox, 0).catch_up()
        except Exception as exc:
            logger.warning("Could not compare %s with the last push seen: %s", target.repo.url, exc)
    threads: list[Any] = []
    watched = [
        Watched(deployments[t.name], t.repo, t.branch)
        for t in targets
        if deployments and deployments.get(t.name) is not None
    ]
    janitor = None
    if watched:
        janitor = Janitor(watched, outbox)
        threads.append(janitor)
        if reap:
            threads.append(Reaper(watched, outbox))
    threads.append(Emitter(outbox, after_send=janitor.wake.set if janitor else None))
    reporting = [(t.link, t.token) for t in targets if t.link is not None and t.token]
    if reporting:
        from deployments.reporter import Reporter

        threads.append(Reporter(outbox.path, reporting, deployments or {}, reap=reap))
    for target in targets:
        seconds = (poll or {}).get(target.name)
        if seconds:
            threads.append(Poller(target.repo, target.branch, outbox, seconds))
    for thread in threads:
        thread.start()
    address = http.server_address
    served = ", ".join(f"{t.repo.url}@{t.branch}" for t in targets[:5])
    if len(targets) > 5:
        served += f" and {len(targets) - 5} more"
    polled = sorted({s for s in (poll or {}).values() if s})
    logger.info(
        "Push receiver for %s on http://%s:%s/webhooks/github (also /gitea, /gitlab)%s",
        served,
        address[0],
        address[1],
        f"; polling every {polled[0]:g} s" if polled else "",
    )
    return http, threads


def _add_deployment(runner: Any, repo_url: str, branch: str, name: str) -> Any:
    """Register the on-push deployment with the runner, which then runs it from this process's
    flow object (as `flow.serve` does); returns the deployment's id."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    from flows.text_generation import nlp_text_generation

    return runner.add_flow(
        nlp_text_generation,
        name=name,
        parameters={"repo_url": repo_url, "branch": branch},
        triggers=triggers(repo_url, branch),
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        description=f"Text generation for every push to {branch} of {repo_url}",
        tags=["textgen", "on-push"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def run_service(
    targets: list[Served],
    host: str,
    port: int,
    poll: dict[str, float] | None = None,
    names: dict[str, str] | None = None,
    prefect_port: int = 4200,
    runs: int = 1,
    ui_port: int = 5000,
) -> int:
    """Serve until interrupted: Prefect API (local if needed), receiver, runner, janitor, and
    the MLflow UI on `ui_port` (0: none) for an embedded store.

    Each target gets its deployment (named by `names`, else `on-push`), with one run at a time
    per repository and branch; the runner runs at most `runs` flow runs at once.
    """
    from deployments.mlflow_ui import UI_URL_ENV, MlflowUI

    names = names or {}
    runner_name = f"textgen-{targets[0].repo.key}" if len(targets) == 1 else "textgen-links"
    ui = None
    if ui_port and not tracking_uri().startswith(("http://", "https://")):
        ui = MlflowUI("127.0.0.1", ui_port)
        ui.start()  # a busy port ends serve here, with the reason
        os.environ.setdefault(UI_URL_ENV, ui.url)  # the links runs record open this UI
    try:
        return _serve(targets, host, port, poll, names, prefect_port, runs, runner_name)
    finally:
        if ui is not None:
            ui.stop()


def _serve(
    targets: list[Served],
    host: str,
    port: int,
    poll: dict[str, float] | None,
    names: dict[str, str],
    prefect_port: int,
    runs: int,
    runner_name: str,
) -> int:
    query_seconds = float(os.environ.get("TEXTGEN_RUNNER_POLL_SECONDS", "0.5"))
    with prefect_api(prefect_port) as api_url:
        from prefect.runner import Runner

        from deployments.warm import enable as enable_warm_starts
        from tasks.tracking import ui_base_url

        enable_warm_starts()

        http = None
        threads: list[Any] = []
        stop = False
        try:
            delay = 1.0
            while not stop:
                runner = Runner(
                    name=runner_name,
                    query_seconds=query_seconds,
                    limit=runs,
                    pause_on_shutdown=False,
                )
                try:
                    deployments = {
                        t.name: _add_deployment(
                            runner, t.repo.url, t.branch, names.get(t.name, DEFAULT_DEPLOYMENT)
                        )
                        for t in targets
                    }
                except Exception as exc:
                    logger.warning(
                        "Cannot register the deployment with %s (%s); retrying", api_url, exc
                    )
                    time.sleep(delay)
                    delay = min(30.0, delay * 2)
                    continue
                if http is None:
                    # Once, as the service starts: a runner restarted later (after an API outage)
                    # may still have runs of its own starting up.
                    for t in targets:
                        try:
                            recover_after_restart(deployments[t.name], t.repo.url)
                        except Exception as exc:
                            logger.warning("Could not check for runs left behind: %s", exc)
                    http, threads = start_receiver(targets, host, port, poll, deployments)
                    address = http.server_address
                    record_service(
                        {
                            "prefect_api": api_url,
                            "mlflow_ui": ui_base_url(),
                            "receivers": [
                                f"http://{address[0]}:{address[1]}/webhooks/{provider}"
                                for provider in ("github", "gitea", "gitlab")
                            ],
                            "deployments": [
                                f"{FLOW_NAME}/{names.get(t.name, DEFAULT_DEPLOYMENT)}"
                                for t in targets
                            ],
                        }
                    )
                    for t in targets:
                        name = names.get(t.name, DEFAULT_DEPLOYMENT)
                        logger.info(
                            "Serving %s/%s: `git push` to %s of %s, or "
                            "`PREFECT_API_URL=%s prefect deployment run '%s/%s'`",
                            FLOW_NAME,
                            name,
                            t.branch,
                            t.repo.url,
                            api_url,
                            FLOW_NAME,
                            name,
                        )
                # Ctrl-C shuts the runner down as gracefully as SIGTERM does.
                signal.signal(signal.SIGINT, runner.handle_sigterm)
                try:
                    asyncio.run(runner.start())
                    stop = runner.stopping  # a signal shut the runner down
                except (KeyboardInterrupt, SystemExit):
                    stop = True
                except Exception as exc:
                    logger.warning("The runner stopped (%s); restarting it", exc)
                if not stop:
                    time.sleep(delay)
                    delay = min(30.0, delay * 2)
        except KeyboardInterrupt:
            pass
        finally:
            forget_service()
            for thread in threads:
                thread.stopping.set()
            if http is not None:
                http.shutdown()
                http.server_close()
    return 0

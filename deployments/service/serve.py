"""`textgen serve` and `textgen receive`: the receiver's threads, and serve's runtime loop.

serve is one process: the on-push deployments and their Prefect runner, the push receiver
(HTTP endpoint, outbox, emitter, pollers, janitor), and the MLflow UI on an embedded store. When
`PREFECT_API_URL` is unset it also supervises a local Prefect server (`ops.prefect_server`).
receive is the receiver alone, for deployments a work pool's workers run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from deployments.ops.mlflow_ui import MlflowUI
from deployments.ops.prefect_server import service_api
from deployments.ops.process import terminate_children
from deployments.orchestration.deployments import add_to_runner
from deployments.service.emitter import Emitter
from deployments.service.http import HttpService, start_http
from deployments.service.outbox import Outbox
from deployments.service.poller import Poller
from deployments.service.providers import PROVIDERS
from deployments.service.receiver import Receiver, Served
from deployments.service.record import forget_service, record_service
from deployments.service.repair import Janitor, Reaper, Watched, recover_after_restart
from deployments.service.reporter import Reporter
from tasks import config
from tasks.config import data_dir
from tasks.errors import ServeError
from tasks.names import DEFAULT_DEPLOYMENT, FLOW_NAME
from tasks.retry import Backoff
from tasks.store import ui_base_url

logger = logging.getLogger(__name__)


def receiver_outbox(targets: list[Served]) -> Outbox:
    """The outbox of the served repositories, in the data folder: one per repository and
    branch for a single one, one for a list of links."""
    if len(targets) == 1 and targets[0].name == targets[0].repo.key:
        name = f"{targets[0].repo.key}-{targets[0].branch.replace('/', '_')}"
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
) -> tuple[HttpService, list[Any]]:
    """Outbox, HTTP endpoint, emitter, janitor, pollers (and the reaper), in background threads.
    `poll` gives the poll interval of the targets to poll, `deployments` the deployment id of
    each target (by name) whose queued runs newer pushes supersede. Returns the HTTP server and
    the threads (each has a `stopping` event)."""
    outbox = receiver_outbox(targets)
    receiver = Receiver.for_links(targets, outbox)
    try:
        http = start_http(receiver, host, port)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc}") from None
    for target in targets:
        try:
            Poller(target.repo, target.branch, outbox, 0).catch_up()
        except Exception as exc:  # a remote away now: pushes it sends later are taken still
            logger.warning("Could not compare %s with the last push seen: %s", target.repo.url, exc)
    threads: list[Any] = []
    watched = [
        Watched(deployments[t.name], t.repo, t.branch)
        for t in targets
        if deployments and deployments.get(t.name) is not None
    ]
    sent: list[Callable[[], None]] = []  # woken when events reached Prefect
    if watched:
        janitor = Janitor(watched, outbox)
        threads.append(janitor)
        sent.append(janitor.wake.set)
        if reap:
            reaper = Reaper(watched, outbox)
            threads.append(reaper)
            sent.append(reaper.pushed)

    def told() -> None:
        for wake in sent:
            wake()

    threads.append(Emitter(outbox, after_send=told if sent else None))
    reporting = [(t.link, t.token) for t in targets if t.link is not None and t.token]
    if reporting:
        threads.append(Reporter(outbox.path, reporting, deployments or {}, reap=reap))
    for target in targets:
        seconds = (poll or {}).get(target.name)
        if seconds:
            threads.append(Poller(target.repo, target.branch, outbox, seconds))
    for thread in threads:
        thread.start()
    served = ", ".join(f"{t.repo.url}@{t.branch}" for t in targets[:5])
    if len(targets) > 5:
        served += f" and {len(targets) - 5} more"
    polled = sorted({s for s in (poll or {}).values() if s})
    polling = f"; polling every {polled[0]:g} s" if polled else ""
    url = f"http://{http.server_address[0]}:{http.server_address[1]}/webhooks/github"
    logger.info("Push receiver for %s on %s (also /gitea, /gitlab)%s", served, url, polling)
    return http, threads


def stop_receiver(http: HttpService | None, threads: list[Any]) -> None:
    """Stop the receiver's threads and its endpoint."""
    for thread in threads:
        thread.stopping.set()
    if http is not None:
        http.shutdown()
        http.server_close()


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
    the MLflow UI on `ui_port` (0: none) for an embedded store. Each target gets its deployment
    (named by `names`, else `on-push`), with one run at a time per repository and branch; the
    runner runs at most `runs` flow runs at once."""
    names = names or {}
    serves_ui = bool(ui_port) and not config.tracking_server()
    ui: MlflowUI | None = None
    with contextlib.ExitStack() as stack:
        if serves_ui:
            ui = MlflowUI("127.0.0.1", ui_port)
            ui.start()  # a busy port ends serve here, with the reason
            stack.callback(ui.stop)
            if config.MLFLOW_UI_URL.name not in os.environ:
                # The links runs record open this UI: runs are processes of their own, started
                # with this environment; serve itself reads it over any a command was given.
                os.environ[config.MLFLOW_UI_URL.name] = ui.url
                stack.enter_context(config.overrides({config.MLFLOW_UI_URL.name: ui.url}))
        from prefect.runner import Runner

        from deployments.service.warm import enable as enable_warm_starts
        from deployments.service.warm import stop as stop_warm_servers

        runner_name = f"textgen-{targets[0].repo.key}" if len(targets) == 1 else "textgen-links"
        api_url = stack.enter_context(service_api(prefect_port))
        enable_warm_starts()
        http: HttpService | None = None
        threads: list[Any] = []
        backoff = Backoff(first=1.0, cap=30.0)
        stop = False
        try:
            while not stop:
                runner = Runner(
                    name=runner_name,
                    query_seconds=config.RUNNER_POLL_SECONDS.get(),
                    limit=runs,
                    pause_on_shutdown=False,
                )
                try:
                    deployments = _register(runner, targets, names)
                except Exception as exc:  # the API away: registering is tried again
                    delay = backoff.next()
                    logger.warning(
                        "Cannot register the deployment with %s (%s); retrying in %.0f s",
                        api_url,
                        exc,
                        delay,
                    )
                    time.sleep(delay)
                    continue
                if http is None:
                    # Once, as the service starts: a runner restarted later (after an API outage)
                    # may still have runs of its own starting up.
                    for t in targets:
                        try:
                            recover_after_restart(deployments[t.name], t.repo)
                        except Exception as exc:  # the runs left behind wait for the next start
                            logger.warning("Could not check for runs left behind: %s", exc)
                    http, threads = start_receiver(targets, host, port, poll, deployments)
                    _announce(http, api_url, targets, names, serves_ui)
                # SIGTERM and Ctrl-C: the MLflow UI begins to stop at once, while the runner
                # shuts down (it cancels the runs in flight, through the Prefect API).
                runner.handle_sigterm = functools.partial(_stopping, runner.handle_sigterm, ui)  # type: ignore[method-assign]
                signal.signal(signal.SIGINT, runner.handle_sigterm)
                try:
                    asyncio.run(runner.start())
                    stop = runner.stopping  # a signal shut the runner down
                except (KeyboardInterrupt, SystemExit):
                    stop = True
                except Exception as exc:  # the runner is restarted: pushes keep coming
                    logger.warning("The runner stopped (%s); restarting it", exc)
                if not stop:
                    time.sleep(backoff.next())
        except KeyboardInterrupt:
            pass
        finally:
            forget_service()
            terminate_children()
            stop_receiver(http, threads)
            stop_warm_servers()
    return 0


def _stopping(stop_runner: Any, ui: MlflowUI | None, *args: Any) -> None:
    """On SIGTERM or Ctrl-C: the MLflow UI starts to stop, then the runner."""
    if ui is not None:
        ui.child.terminate()
    stop_runner(*args)


def _register(runner: Any, targets: list[Served], names: dict[str, str]) -> dict[str, Any]:
    return {
        t.name: add_to_runner(runner, t.repo.url, t.branch, names.get(t.name, DEFAULT_DEPLOYMENT))
        for t in targets
    }


def _announce(
    http: HttpService, api_url: str, targets: list[Served], names: dict[str, str], ui: bool
) -> None:
    """Record serve for `textgen status`, and say how to push or run by hand."""
    address = http.server_address
    receivers = [f"http://{address[0]}:{address[1]}/webhooks/{p}" for p in PROVIDERS]
    deployments = [f"{FLOW_NAME}/{names.get(t.name, DEFAULT_DEPLOYMENT)}" for t in targets]
    record_service(
        {
            "prefect_api": api_url,
            "mlflow_ui": ui_base_url(),
            "serves_ui": ui,
            "started": time.time(),
            "receivers": receivers,
            "deployments": deployments,
        }
    )
    for t, deployment in zip(targets, deployments, strict=True):
        logger.info(
            "Serving %s: `git push` to %s of %s, or "
            "`PREFECT_API_URL=%s prefect deployment run '%s'`",
            deployment,
            t.branch,
            t.repo.url,
            api_url,
            deployment,
        )


def run_receiver(
    targets: list[Served],
    host: str,
    port: int,
    poll: dict[str, float],
    deployments: dict[str, str],
    reap: bool,
    prefect_port: int = 4200,
) -> int:
    """The receiver alone until interrupted, for deployments a work pool's workers run:
    `deployments` names each target's deployment (by target name), whose queued runs newer
    pushes supersede (and, with `reap`, whose crashed runs are retried and ended)."""
    import threading

    from deployments.orchestration import queries

    with service_api(prefect_port):
        ids: dict[str, Any] = {}
        for target_name, wanted in deployments.items():
            with queries.client() as api:
                ids[target_name] = queries.deployment_id(api, wanted)
            if ids[target_name] is None:
                raise ServeError(
                    f"deployment {FLOW_NAME}/{wanted} does not exist on the Prefect API: "
                    f"create it with `textgen team apply` (links) or `prefect deploy "
                    f"--prefect-file deployments/prefect.yaml`, or pass --deployment ''"
                )
        http, threads = start_receiver(targets, host, port, poll, ids, reap=reap)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        finally:
            stop_receiver(http, threads)
    return 0

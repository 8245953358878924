"""Warm starts for the runs `textgen serve` executes.

Prefect's runner starts each served run in a fresh interpreter (multiprocessing's `spawn`), which
imports Prefect, MLflow, torch and transformers again: about four seconds on every run. Here runs
start with `forkserver` instead: one single-threaded server process imports those libraries once,
and each run is a fork of it, isolated in a process of its own, cancellable and crash-contained.

The model stays warm too. A run that loads a model writes which one into a hint file (its path is
in the runs' environment). When the hint names another model than the fork server holds, a new
fork server loads it into `tasks.model`'s cache before it serves (the same model, revision, dtype
and device: the same pipeline; see `warm_model`), once no run is going: a load beside a run would
slow the run and skew the speed it records, and a run that starts during a load waits for it.
Once it is ready, later runs fork from it, and the old server stops when the last run it started
has ended. The operator settings `WARM_START`
and `WARM_MODEL_START` (`tasks.config`) turn this off, or keep the warm imports and load the
model in each run.

Prefect has no public way to choose how a served run's process starts: `run_flow_in_subprocess` of
`prefect.runner._starter_direct` is the documented override point of its `DirectSubprocessStarter`,
in a private module. tests/test_internals.py fails loudly when it changes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks import config

logger = logging.getLogger(__name__)

PRELOAD = (
    "flows.text_generation",
    "mlflow",
    "mlflow.data.pandas_dataset",
    "mlflow.store.tracking.sqlalchemy_store",
    "pandas",
    "torch",
    "transformers",
    "transformers.pipelines",
)

SETTLE_SECONDS = 300.0
"""How long a run's start waits for a model being loaded warm (a run that would load it itself
takes as long); past that it starts beside the load, and records that its cores were shared."""

_lock = threading.Lock()


class _ForkingMultiprocessing:
    """Stands in for the `multiprocessing` module inside Prefect's flow engine, for one call:
    asked for the `spawn` context, it gives the fork server's."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)

    def get_context(self, method: str | None = None) -> Any:
        return self._context if method == "spawn" else multiprocessing.get_context(method)


MODEL_ENV = config.WARM_MODEL.name
"""For a fork server: the model to load before serving, as the hint file wrote it."""
READY_ENV = config.WARM_READY.name
"""For a fork server: the file it writes once the model is loaded (or failed to load)."""
MODEL_MODULE = "deployments.service.warm_model"


def enabled() -> bool:
    """Whether warm starts are on (the operator's switch, default on)."""
    return bool(config.WARM_START.get())


class WarmServers:
    """The fork servers runs start from: the current one (holding the last model a run
    loaded) and retired ones that still parent running runs."""

    def __init__(self, preload: Sequence[str], hint: Path) -> None:
        self.preload = list(preload)
        self.hint = hint
        self.current: Any = multiprocessing.forkserver._forkserver
        self.handled = ""
        """The last hint acted on (loaded, or failed to load: not tried again until it changes)."""
        self.pending: tuple[Any, str, Path, float] | None = None
        self.children: dict[int, list[Any]] = {}
        self.retired: list[Any] = []
        self._seen_mtime = 0.0

    def launched(self, process: Any) -> None:
        """Remember which server parents `process` (a run just started)."""
        self.children.setdefault(id(self.current), []).append(process)

    def _running(self, server: Any) -> bool:
        procs = self.children.get(id(server), [])
        # Read only what Prefect's own polling recorded: polling here would consume the
        # exit status its runner waits for.
        alive = [p for p in procs if getattr(getattr(p, "_popen", None), "returncode", 0) is None]
        self.children[id(server)] = alive
        return bool(alive)

    def _start(self, record: str) -> None:
        server = multiprocessing.forkserver.ForkServer()
        server.set_forkserver_preload([*self.preload, MODEL_MODULE])
        ready = self.hint.with_name(f"{self.hint.name}.ready-{time.monotonic_ns()}")
        saved = {name: os.environ.get(name) for name in (MODEL_ENV, READY_ENV)}
        os.environ.update({MODEL_ENV: record, READY_ENV: str(ready)})
        try:
            server.ensure_running()  # the server process inherits the two variables
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self.pending = (server, record, ready, time.monotonic())
        logger.info("Loading model %s into a new fork server", json.loads(record).get("model"))

    def busy(self) -> bool:
        """Whether a run started from any of the servers is still going."""
        return any([self._running(server) for server in (self.current, *self.retired)])

    def settle(self, timeout: float = SETTLE_SECONDS, interval: float = 0.2) -> None:
        """Before a run starts: let a model being loaded finish (up to `timeout`), so the run
        does not share the cores with the load, and forks from the server holding it."""
        if self.pending is None:
            return
        logger.info("Waiting for the model being loaded warm before starting the run")
        deadline = time.monotonic() + timeout
        while self.pending is not None and time.monotonic() < deadline:
            time.sleep(interval)
            self.check()

    def check(self, timeout: float = 1800.0) -> None:
        """Start a server for a newly hinted model while no run is going; swap to it when
        ready; stop idle old ones. Called with the starter's lock held, between run starts."""
        if self.pending is not None:
            server, record, ready, started = self.pending
            if ready.exists():
                outcome = ready.read_text().strip()
                ready.unlink(missing_ok=True)
                self.pending = None
                if outcome == "ready":
                    self.retired.append(self.current)
                    self.current, self.handled = server, record
                    logger.info("Runs now start with model %s loaded", json.loads(record)["model"])
                else:
                    logger.warning("Could not keep the model warm: %s", outcome)
                    self.handled = record  # do not retry the same model on every check
                    server._stop()
            elif time.monotonic() - started > timeout:
                logger.warning("Gave up keeping the model warm: not loaded in %.0f s", timeout)
                self.pending, self.handled = None, record
                with contextlib.suppress(OSError):  # still loading: stop it, do not wait on it
                    os.kill(server._forkserver_pid, signal.SIGKILL)
                server._stop()
        elif not self.busy():  # loading beside a run would slow it, and skew its timings
            try:
                mtime = self.hint.stat().st_mtime
            except OSError:
                mtime = 0.0
            if mtime and mtime != self._seen_mtime:
                self._seen_mtime = mtime
                try:
                    record = json.dumps(json.loads(self.hint.read_text()), sort_keys=True)
                except (OSError, ValueError):
                    record = ""
                if record and record != self.handled:
                    self._start(record)
        self._running(self.current)  # forget the current server's runs that have ended
        for server in list(self.retired):
            if not self._running(server) and server is not self.current:
                self.retired.remove(server)
                # The first, plain server too: it holds no model, and is started again if
                # ever asked for.
                server._stop()
                self.children.pop(id(server), None)


def stop() -> None:
    """Stop every fork server (the runs forked from them are processes of their own), when
    serve stops."""
    servers = _servers[0] if _servers else None
    found: list[Any] = [multiprocessing.forkserver._forkserver]
    if servers is not None:
        found += [servers.current, *servers.retired]
        if servers.pending is not None:
            found.append(servers.pending[0])
    for server in dict.fromkeys(found):
        pid = getattr(server, "_forkserver_pid", None)
        if pid:
            with contextlib.suppress(OSError):  # one loading a model does not read its pipe
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            server._stop()


_servers: list[WarmServers] = []
"""The fork servers of this process, once `enable` started them."""


def enable(preload: Sequence[str] = PRELOAD, runner: bool = True) -> bool:
    """Start the fork server (importing `preload` there), so that `launch` starts runs warm;
    with `runner`, route the runs of this process's Prefect runner (`textgen serve`) through
    `launch`. False, leaving Prefect's own starter in place, where forkserver is unavailable."""
    if not enabled() or "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    multiprocessing.forkserver.ensure_running()  # import once now: the first run is warm too
    _shim.append(_ForkingMultiprocessing(context))
    if config.WARM_MODEL_START.get():
        folder = tempfile.mkdtemp(prefix="textgen-warm-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        hint = Path(folder) / "model.json"
        os.environ[config.WARM_HINT.name] = str(hint)  # the runs are forked with it
        servers = WarmServers(preload, hint)
        _servers.append(servers)
        _start_checker(servers)
    if runner:
        import prefect.runner._starter_direct as starter

        starter.run_flow_in_subprocess = launch
    logger.info("Runs start warm: forked from a server that imported %s", ", ".join(preload))
    return True


_shim: list[_ForkingMultiprocessing] = []
"""The stand-in for `multiprocessing` that gives the fork server's context, once enabled."""


def launch(*args: Any, **kwargs: Any) -> Any:
    """Prefect's `run_flow_in_subprocess(flow, flow_run, env=...)`, the run's process forked
    from the fork server holding the last model (cold, as Prefect starts it, until `enable`)."""
    import prefect.flow_engine as engine

    if not _shim:
        return engine.run_flow_in_subprocess(*args, **kwargs)
    servers = _servers[0] if _servers else None
    module = multiprocessing.forkserver
    with _lock:
        if servers is not None:
            _check(servers)
            _check(servers, settle=True)
            module.connect_to_new_process = servers.current.connect_to_new_process
        engine.multiprocessing = _shim[0]  # type: ignore[assignment]
        try:
            process = engine.run_flow_in_subprocess(*args, **kwargs)
            if servers is not None:
                servers.launched(process)
            return process
        finally:
            engine.multiprocessing = multiprocessing
            module.connect_to_new_process = module._forkserver.connect_to_new_process


def _check(servers: WarmServers, settle: bool = False) -> None:
    """`servers.check()` (`settle`: `servers.settle()`), whose failure is logged: keeping a
    model warm never stops a run."""
    try:
        servers.settle() if settle else servers.check()
    except Exception:
        logger.exception("Warm-model check failed")


def _start_checker(servers: WarmServers, interval: float = 1.0) -> None:
    """Check for a newly hinted model between runs too, so it is loaded before the next run."""

    def loop() -> None:
        while True:
            time.sleep(interval)
            with _lock:
                _check(servers)

    threading.Thread(target=loop, name="textgen-warm-models", daemon=True).start()

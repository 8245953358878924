"""Serve keeps the last model a run loaded warm: later runs fork from a server that holds it."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import time
from pathlib import Path
from typing import Any

import pytest

from deployments.service.warm import WarmServers
from tasks import config
from tasks.model import locate_model, note_loaded
from tasks.settings import GenerationSettings

PRELOAD = ("tasks.model", "tasks.generate")
"""What these fork servers import before serving: what the runs here use (serve's own list,
`warm.PRELOAD`, adds the flow, MLflow and pandas, which cost seconds per server)."""


def _child(queue: Any, model: str) -> None:
    import torch

    from tasks.generate import run_generation
    from tasks.model import build_generator

    settings = GenerationSettings(model=model, max_new_tokens=8)
    generator = build_generator(settings)
    texts = run_generation(generator, settings).texts
    queue.put((generator.cache_hit, torch.get_num_threads(), texts, os.getpid()))


def launch(servers: WarmServers, model: str) -> tuple[bool, int, list[str], int]:
    """Start one process the way serve starts a run, from the current server."""
    module = multiprocessing.forkserver
    context = multiprocessing.get_context("forkserver")
    queue = context.Queue()
    module.connect_to_new_process = servers.current.connect_to_new_process  # type: ignore[attr-defined]
    try:
        process = context.Process(target=_child, args=(queue, model))
        process.start()
    finally:
        module.connect_to_new_process = module._forkserver.connect_to_new_process  # type: ignore[attr-defined]
    servers.launched(process)
    result = queue.get(timeout=300)
    process.join(60)
    return result


def wait_swap(servers: WarmServers, deadline: float = 120.0) -> None:
    end = time.monotonic() + deadline
    servers.check()
    while servers.pending is not None and time.monotonic() < end:
        time.sleep(0.2)
        servers.check()
    assert servers.pending is None


@pytest.fixture
def hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "model.json"
    monkeypatch.setenv(config.WARM_HINT.name, str(path))
    return path


def test_a_run_notes_its_model_and_the_next_one_finds_it_loaded(
    tiny_model: Path, hint: Path
) -> None:
    import torch

    settings = GenerationSettings(model=str(tiny_model))
    path = locate_model(settings)
    record = note_loaded(settings, "sha256:abc", path)
    assert json.loads(hint.read_text()) == record
    assert record == {
        "model": str(tiny_model),
        "revision": None,
        "dtype": None,
        "digest": "sha256:abc",
        "path": str(path),
    }
    from tasks.model import local_revision

    note_loaded(settings, local_revision(settings, path), path)

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    servers = WarmServers(PRELOAD, hint)
    cold = launch(servers, str(tiny_model))
    assert cold[0] is False  # the plain server holds no model
    wait_swap(servers)
    assert servers.current is not multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    warm = launch(servers, str(tiny_model))
    assert warm[0] is True, "the run forked from the new server found the model loaded"
    assert warm[1] == cold[1] == torch.get_num_threads()  # threads restored in the child
    assert warm[2] == cold[2]  # same texts
    servers.check()
    assert servers.retired == []  # the plain server had no running child left: stopped
    assert servers.children[id(servers.current)] == []  # ended runs are forgotten
    servers.current._stop()


def test_a_model_that_cannot_load_keeps_the_current_server(
    tiny_model: Path, hint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hint.write_text(json.dumps({"model": str(tiny_model), "path": "/nonexistent/model"}))
    servers = WarmServers(PRELOAD, hint)
    before = servers.current
    with caplog.at_level("WARNING", logger="deployments.service.warm"):
        wait_swap(servers)
    assert servers.current is before
    assert "Could not keep the model warm" in caplog.text
    servers.check()  # the same hint is not tried again
    assert servers.pending is None


def test_without_serve_a_run_notes_nothing(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(config.WARM_HINT.name, raising=False)
    assert note_loaded(GenerationSettings(model=str(tiny_model)), None, None) is None


def _sleeper(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.slow  # a fork server importing the stack, then a model
def test_a_model_is_loaded_only_while_no_run_is_going(tiny_model: Path, hint: Path) -> None:
    """Loading a model beside a run would slow the run and skew the speed it records: the hint
    waits until the run has ended; a run that starts during a load waits for it (`settle`)."""
    settings = GenerationSettings(model=str(tiny_model))
    path = locate_model(settings)
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    servers = WarmServers(PRELOAD, hint)
    module = multiprocessing.forkserver
    context = multiprocessing.get_context("forkserver")
    module.connect_to_new_process = servers.current.connect_to_new_process  # type: ignore[attr-defined]
    try:
        run = context.Process(target=_sleeper, args=(3.0,))
        run.start()
    finally:
        module.connect_to_new_process = module._forkserver.connect_to_new_process  # type: ignore[attr-defined]
    servers.launched(run)
    note_loaded(settings, "sha256:abc", path)  # the run loaded a model
    servers.check()
    assert servers.busy() and servers.pending is None, "no load while the run is going"
    run.join(30)  # the run ends (its exit status read, as Prefect's runner reads it)
    servers.check()
    assert servers.pending is not None, "the load starts once no run is going"
    servers.settle(timeout=120)  # the next run's start waits for it
    assert servers.pending is None and servers.current is not module._forkserver  # type: ignore[attr-defined]
    servers.current._stop()

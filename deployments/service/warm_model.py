"""Imported by a fork server of `textgen serve` before it serves: load the model a run noted
(`tasks.config.WARM_MODEL`) into `tasks.model`'s cache, so the runs forked from here find it loaded.

The model is loaded with one torch thread: no OpenMP thread pool exists at the fork, which a
forked child could not use. Each child gets the server's thread count back right after it is
forked. Whatever happens is written to the ready file serve named (`ready`, or why not); an error
never stops the server, which then serves as the plain warm one does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _load() -> None:
    from tasks import config

    record = config.WARM_MODEL.get()
    ready = config.WARM_READY.get()
    if not record or not ready:
        return
    try:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(threads))
        from tasks.model import load_noted

        load_noted(json.loads(record))
        outcome = "ready"
    except BaseException as exc:  # reported to serve, which logs it
        outcome = f"{type(exc).__name__}: {exc}"
    Path(ready).write_text(outcome)


_load()

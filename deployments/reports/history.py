"""`textgen history`: a repository's runs and versions, newest first, as rows of a table."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

from tasks import tags as T
from tasks import versions
from tasks.errors import SettingsError
from tasks.gates import failed_gates
from tasks.recovery import recover_dead_runs
from tasks.store import Experiment

logger = logging.getLogger(__name__)


def _fmt_time(millis: int | None) -> str:
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_since(text: str) -> int:
    """`--since` in epoch milliseconds, from a date (2026-11-01T12:00) or an age (3d, 12h, 2w)."""
    match = re.fullmatch(r"(\d+)\s*([mhdw])", text.strip())
    if match:
        unit = {"m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return int((datetime.now(UTC).timestamp() - int(match.group(1)) * unit) * 1000)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SettingsError(
            f"--since {text!r}: expected a date (2026-11-01 or 2026-11-01T12:00) "
            f"or an age (3d, 12h, 30m, 2w)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def history_rows(
    repo: str,
    limit: int | None,
    since: str | None = None,
    commit: str | None = None,
    model: str | None = None,
) -> list[dict[str, str]]:
    """The experiment's runs, newest first, as rows of the history table: the first `limit`
    (all for None)."""
    experiment = Experiment.for_repo(repo, create=False)
    try:  # a run whose process died shows FAILED, not RUNNING forever
        recover_dead_runs(experiment)
    except Exception as exc:  # the list is still worth showing; a dead run shows next time
        logger.warning("Could not check for runs left RUNNING: %s", exc)
    filters = []
    if since:
        filters.append(f"attributes.start_time >= {parse_since(since)}")
    if commit:
        if not re.fullmatch(r"[0-9a-fA-F]{1,40}", commit):
            raise SettingsError(f"--commit {commit!r}: expected a (short) SHA")
        filters.append(f"tags.`{T.COMMIT}` LIKE '{commit.lower()}%'")
    if model:
        pattern = model.replace("'", "") if "%" in model else f"%{model.replace(chr(39), '')}%"
        filters.append(f"params.model LIKE '{pattern}'")
    rows = []
    for run in versions.history(experiment, filters, limit):
        found = run.data.tags
        outcome = found.get(T.OUTCOME, "")
        version = found.get(T.VERSION, "") if outcome == T.NEW else ""
        if outcome == T.REUSED:
            version = f"={found.get(T.REUSED_VERSION, '')}"
        model_name = run.data.params.get("model", "")
        if model_name.startswith(("/", ".", "~")):  # a local folder: its name
            model_name = model_name.rstrip("/").rsplit("/", 1)[-1]
        reason = found.get(T.FAILURE) or found.get(T.SKIP_REASON) or ""
        if outcome == T.PREVIEW:
            reason = reason or f"preview of PR #{found.get(T.PREVIEW_PR, '?')}, never numbered"
        if gated := failed_gates(found):
            reason = f"gated: {gated}" + (f"; {reason}" if reason else "")
        row = {
            "version": version,
            "commit": found.get(T.COMMIT, "")[:7],
            "settings": found.get(T.DIGEST, "")[:12],
            "model": model_name,
            "status": run.info.status,
            "outcome": f"{outcome} (gated)" if gated else outcome,
            "trigger": found.get(T.TRIGGER, ""),
            "gates": found.get(T.GATES, ""),
            "started": _fmt_time(run.info.start_time),
            "run id": run.info.run_id,
            "reason": reason,
        }
        rows.append(row)
    return rows

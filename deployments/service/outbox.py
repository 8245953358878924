"""The outbox: the one owner of the receiver's SQLite file, and of its schema.

- `deliveries`: every accepted delivery, durable before the receiver answers 202, and its event
  until the Prefect API has taken it (`pending`, then `sent`; `duplicate`, `refused`).
- `reports`: the pushes whose result goes back to the provider (`service.reporter`), written in
  the push's own transaction.
- `state`: small values (the poller's last tip, a pull request's comment id, the repair loops'
  failure counts).

`pushes()` reads every outbox of a data folder, read-only, for `textgen status`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deployments.service.providers import PushEvent
from tasks import config
from tasks.repo import RepoLocation

logger = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024
"""Events stay far below the Prefect server's limit (PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES,
1.5 MB by default), which it enforces by dropping the event after answering 2xx."""
_EVENT_NAMESPACE = uuid.UUID("6f1c3a52-8d7e-4f43-9a55-2c1f0e6b7d10")
_SCHEMA = """
    PRAGMA journal_mode=WAL;
    CREATE TABLE IF NOT EXISTS deliveries (
        provider TEXT NOT NULL,
        delivery TEXT NOT NULL,
        repo TEXT NOT NULL,
        ref TEXT NOT NULL,
        after TEXT NOT NULL,
        status TEXT NOT NULL,
        event TEXT,
        received_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        sent_at REAL,
        before_sha TEXT,
        PRIMARY KEY (provider, delivery)
    );
    CREATE UNIQUE INDEX IF NOT EXISTS one_event_per_commit
        ON deliveries (repo, ref, after) WHERE status IN ('pending', 'sent');
    CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS reports (
        provider TEXT NOT NULL,
        delivery TEXT NOT NULL,
        link TEXT NOT NULL,
        kind TEXT NOT NULL,
        sha TEXT NOT NULL,
        pr INTEGER,
        phase TEXT NOT NULL DEFAULT 'queued',
        result TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        created_at REAL NOT NULL,
        PRIMARY KEY (provider, delivery)
    );
"""


def event_document(
    push: PushEvent, repo: RepoLocation, branch: str, received_at: float
) -> dict[str, Any]:
    """The Prefect event for a push: stable id per delivery, repository and branch as labels.
    Past `MAX_EVENT_BYTES` the changed paths are left out (the flow then asks git what changed)."""
    event = _event(push, repo, branch, received_at)
    if push.changed_paths is not None and len(json.dumps(event)) > MAX_EVENT_BYTES:
        event = _event(replace(push, changed_paths=None), repo, branch, received_at)
    return event


def _event(push: PushEvent, repo: RepoLocation, branch: str, received_at: float) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid5(_EVENT_NAMESPACE, f"{push.provider}:{push.delivery}")),
        "occurred": datetime.fromtimestamp(received_at, UTC).isoformat(),
        "event": push.event_name,
        "resource": {
            "prefect.resource.id": f"git.repo.{repo.key}",
            "prefect.resource.name": repo.display_name,
            "git.repository": repo.url,
            "git.branch": branch,
        },
        "payload": {**asdict(push), "branch": push.branch, "repository": repo.url},
    }


class Outbox:
    """Accepted pushes, durable on disk until the Prefect API has taken them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.wake = threading.Event()
        with self._connect() as db:
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
            if "before_sha" not in columns:  # an outbox written before pushes were chained
                db.execute("ALTER TABLE deliveries ADD COLUMN before_sha TEXT")
            if "run_seen_at" not in columns:  # written before runs were checked for
                db.execute("ALTER TABLE deliveries ADD COLUMN run_seen_at REAL")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def enqueue(
        self, push: PushEvent, repo: RepoLocation, branch: str, report: str | None = None
    ) -> tuple[str, str | None]:
        """Store a push; returns (queued | duplicate delivery | duplicate commit, event id).
        `report` names the link whose provider hears how the run went: a queued push is then
        also a row of `reports`, in the same transaction (see service.reporter)."""
        now = time.time()
        event = event_document(push, repo, branch, now)
        key = (push.provider, push.delivery)
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            seen = db.execute(
                "SELECT status FROM deliveries WHERE provider = ? AND delivery = ?", key
            ).fetchone()
            if seen:
                db.execute("COMMIT")
                return "duplicate delivery", None
            same_commit = db.execute(
                "SELECT 1 FROM deliveries WHERE repo = ? AND ref = ? AND after = ? "
                "AND status IN ('pending', 'sent')",
                (repo.url, push.ref, push.after),
            ).fetchone()
            status = "duplicate" if same_commit else "pending"
            db.execute(
                "INSERT INTO deliveries "
                "(provider, delivery, repo, ref, after, status, event, received_at, before_sha) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, repo.url, push.ref, push.after, status, json.dumps(event), now, push.before),
            )
            if report is not None and not same_commit:
                kind = "preview" if push.pull_request else "push"
                number = (push.pull_request or {}).get("number")
                db.execute(
                    "INSERT OR IGNORE INTO reports "
                    "(provider, delivery, link, kind, sha, pr, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*key, report, kind, push.after, number, now),
                )
            db.execute("COMMIT")
        if same_commit:
            return "duplicate commit", None
        self.wake.set()
        return "queued", str(event["id"])

    def pending(self, limit: int = 100) -> list[tuple[str, str, dict[str, Any]]]:
        """Events not yet taken by Prefect, oldest first: (provider, delivery, event)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT provider, delivery, event FROM deliveries WHERE status = 'pending' "
                "ORDER BY received_at LIMIT ?",
                (limit,),
            ).fetchall()
        return [(p, d, json.loads(e)) for p, d, e in rows]

    def mark(self, provider: str, delivery: str, error: str | None, refused: bool = False) -> None:
        """Record an attempt: sent when `error` is None, else still pending with the error;
        `refused` (the API rejected the event itself) ends it as `refused`, kept with its
        error for the operator (`/healthz` counts it), so it blocks no later push."""
        value: str | float
        with self._lock, self._connect() as db:
            if refused:
                change, value = "status = 'refused', last_error = ?", (error or "")[:2000]
            elif error is None:
                change, value = "status = 'sent', sent_at = ?, last_error = NULL", time.time()
            else:
                change, value = "last_error = ?", error[:2000]
            db.execute(
                f"UPDATE deliveries SET {change}, attempts = attempts + 1 "
                "WHERE provider = ? AND delivery = ?",
                (value, provider, delivery),
            )

    def latest(self, repo: RepoLocation, branch: str) -> str | None:
        """The SHA the branch was last pushed to, by the order of the pushes, not of arrival:
        a push whose SHA a later push replaced (`before`) is older, however late it came. Among
        those no push replaced, the last to arrive wins (a chain broken by a lost delivery, or a
        branch pushed back and forth)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT after, before_sha FROM deliveries WHERE repo = ? AND ref = ? "
                "AND status IN ('pending', 'sent') ORDER BY received_at DESC LIMIT 500",
                (repo.url, f"refs/heads/{branch}"),
            ).fetchall()
        if not rows:
            return None
        replaced = {before for _, before in rows if before}
        return str(next((after for after, _ in rows if after not in replaced), rows[0][0]))

    def prune(self, older_than: float | None = None) -> int:
        """Forget deliveries handled more than `older_than` seconds ago (the operator's
        retention by default); returns how many."""
        cutoff = time.time() - (retention_seconds() if older_than is None else older_than)
        with self._lock, self._connect() as db:
            cursor = db.execute(
                "DELETE FROM deliveries WHERE status IN ('sent', 'duplicate') AND received_at < ?",
                (cutoff,),
            )
            # Results the provider took (or refused) are kept as long.
            db.execute(
                "DELETE FROM reports WHERE phase IN ('done', 'gave_up') AND created_at < ?",
                (cutoff,),
            )
            return int(cursor.rowcount)

    def without_run(
        self, repo: RepoLocation, branch: str, older_than: float
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """Sent events no flow run has been seen for yet, sent over `older_than` seconds ago
        (and within a day): (provider, delivery, event), oldest first."""
        now = time.time()
        with self._connect() as db:
            rows = db.execute(
                "SELECT provider, delivery, event FROM deliveries WHERE status = 'sent' "
                "AND run_seen_at IS NULL AND repo = ? AND ref = ? AND sent_at < ? "
                "AND sent_at > ? ORDER BY received_at LIMIT 200",
                (repo.url, f"refs/heads/{branch}", now - older_than, now - 86400),
            ).fetchall()
        return [(p, d, json.loads(e)) for p, d, e in rows]

    def run_seen(self, provider: str, delivery: str) -> None:
        """Record that a flow run exists for a sent event."""
        with self._lock, self._connect() as db:
            db.execute(
                "UPDATE deliveries SET run_seen_at = ? WHERE provider = ? AND delivery = ?",
                (time.time(), provider, delivery),
            )

    def counts(self) -> dict[str, int]:
        """Deliveries by status."""
        with self._connect() as db:
            return dict(db.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status"))

    def get_state(self, key: str) -> str | None:
        """A small persisted value (the poller's last seen SHA)."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        """Persist a small value."""
        with self._lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    # The results that go back to the provider (service.reporter)

    def due_reports(self, limit: int = 200) -> list[Report]:
        """Report rows due now, oldest first."""
        with self._connect() as db:
            found = db.execute(
                "SELECT provider, delivery, link, kind, sha, pr, phase, result, attempts, "
                "created_at FROM reports WHERE phase IN ('queued', 'pending', 'final') "
                "AND next_at <= ? ORDER BY created_at LIMIT ?",
                (time.time(), limit),
            ).fetchall()
        return [
            Report(p, d, link, k, sha, pr, phase, json.loads(r) if r else None, a, c)
            for p, d, link, k, sha, pr, phase, r, a, c in found
        ]

    def update_report(self, row: Report, **values: Any) -> Report:
        """Store new values of a report row; returns the row as it is now."""
        stored = {k: json.dumps(v) if k == "result" else v for k, v in values.items()}
        columns = ", ".join(f"{k} = ?" for k in stored)
        with self._lock, self._connect() as db:
            db.execute(
                f"UPDATE reports SET {columns} WHERE provider = ? AND delivery = ?",
                (*stored.values(), row.provider, row.delivery),
            )
        kept = {k: v for k, v in values.items() if k in Report.__dataclass_fields__}
        return replace(row, **kept)

    # The repair loops' health, for `textgen status`

    def count_failure(self, loop: str, what: str, count: int = 1) -> None:
        """`count` more failures of a loop (janitor, reaper, reporter, poller), with the last
        one; best effort: a store that cannot be written is what the loop's own log says."""
        key = f"failures:{loop}"
        try:
            with self._lock, self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
                before = int(json.loads(row[0])["count"]) if row else 0
                value = {"count": before + count, "last": what[:500], "at": time.time()}
                db.execute(
                    "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                    (key, json.dumps(value)),
                )
                db.execute("COMMIT")
        except (sqlite3.Error, ValueError, KeyError) as exc:
            logger.warning("Could not count the failure of the %s in %s: %s", loop, self.path, exc)


@dataclass(frozen=True)
class Report:
    """One push (or pull request head) whose result goes back to the provider."""

    provider: str
    delivery: str
    link: str
    kind: str
    sha: str
    pr: int | None
    phase: str
    result: dict[str, Any] | None
    attempts: int
    created_at: float


def retention_seconds() -> float:
    """How long handled deliveries are kept (the operator's retention, default 14 days)."""
    return config.OUTBOX_RETENTION_DAYS.get() * 86400


def _each_outbox(folder: Path, query: str) -> Iterator[list[Any]]:
    """The rows `query` finds in each outbox in `folder` that can be read, read-only."""
    for path in sorted(folder.glob("*.sqlite")):
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
                rows = db.execute(query).fetchall()
        except sqlite3.Error:
            continue
        yield rows


def pushes(folder: Path) -> list[dict[str, Any]]:
    """The newest push of each repository and ref in the outboxes in `folder`, read-only: its
    commit, when it arrived, whether it was sent to Prefect, and how many wait to be sent."""
    found: list[dict[str, Any]] = []
    newest_first = (
        "SELECT repo, ref, after, status, received_at FROM deliveries "
        "WHERE status IN ('pending', 'sent') ORDER BY received_at DESC LIMIT 500"
    )
    for rows in _each_outbox(folder, newest_first):
        newest: dict[tuple[str, str], dict[str, Any]] = {}
        for repo, ref, after, status, received in rows:
            entry = newest.setdefault(
                (repo, ref),
                {"repo": repo, "ref": ref, "after": after, "status": status, "received": received},
            )
            entry["unsent"] = entry.get("unsent", 0) + (1 if status == "pending" else 0)
        found += newest.values()
    return found


def failures(folder: Path) -> dict[str, dict[str, Any]]:
    """The repair loops' failures recorded in the outboxes in `folder`, added up by loop."""
    totals: dict[str, dict[str, Any]] = {}
    for rows in _each_outbox(folder, "SELECT key, value FROM state WHERE key LIKE 'failures:%'"):
        for key, value in rows:
            loop, entry = key.removeprefix("failures:"), json.loads(value)
            total = totals.setdefault(loop, {"count": 0, "last": "", "at": 0.0})
            total["count"] += entry["count"]
            if entry["at"] >= total["at"]:
                total["last"], total["at"] = entry["last"], entry["at"]
    return totals

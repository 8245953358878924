"""Results back where the developer works: commit statuses and pull-request comments.

Every push (and pull request head) the receiver queues for a link with an API `token` is also a
report row of the outbox, written in the same transaction. This thread, in the receiver's
process, walks each row through its phases:

- `queued`: set a `pending` status on the commit.
- `pending`: wait for the push's flow run to end, then read its MLflow record and decide the
  final status: success (version N, or the preview), skipped (with the reason), or failure
  (with the reason, or the quality gate that failed). The decision is stored before it is posted.
- `final`: post it; for a preview, also the comparison with the base branch's latest version, as
  the pull request's one comment, edited in place on later pushes.
- `done` (or `gave_up`, when the provider refused it: the error is logged).

The token lives only in the serving process's memory: it is read once at start (`Served.of`),
its environment variable removed so no flow run started from there inherits it, and it is sent
only in a header. The flow never sees it, so a pull request from a fork cannot read it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from deployments.orchestration import queries
from deployments.reports.comments import failed_preview_comment, preview_comment
from deployments.service.forge import Forge, ForgeError, Status, forge_for
from deployments.service.outbox import Outbox, Report
from deployments.service.repair import RETRIED_TAG, Failures
from tasks import tags as T
from tasks import versions
from tasks.bounded import shorten
from tasks.errors import TextgenError
from tasks.gates import failed_gates
from tasks.links import Link
from tasks.names import PREVIEW_TRIGGER, SKIPPED, SUPERSEDED
from tasks.retry import Backoff
from tasks.store import Experiment

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
CRASH_GRACE_SECONDS = 120.0
"""How long a crashed push run may wait for the reaper's retry before it counts as failed."""
GIVE_UP_SECONDS = 86400.0


def context(link: str, kind: str) -> str:
    """The status context: named after the deployment (`textgen/<link>`, `.../preview`)."""
    return f"textgen/{link}" + ("/preview" if kind == PREVIEW_TRIGGER else "")


def marker(link: str) -> str:
    """What marks the one preview comment of a deployment in a pull request."""
    return f"<!-- textgen-preview {link} -->"


class Reporter(threading.Thread):
    """Posts statuses and preview comments for the queued pushes of links with a token."""

    def __init__(
        self,
        outbox: Path,
        links: list[tuple[Link, str]],
        deployments: dict[str, Any],
        reap: bool = False,
        seconds: float = 1.0,
        client: Any = None,
    ) -> None:
        """`outbox`: the outbox's file; `links`: each link with its resolved token (`Served.of`)."""
        super().__init__(name="textgen-reporter", daemon=True)
        self.outbox = Outbox(outbox)
        self.failures = Failures("reporter", self.outbox)
        self.links = {link.name: link for link, _ in links}
        self.deployments = deployments
        self.reap = reap
        self.seconds = seconds
        self.stopping = threading.Event()
        self.backoff = Backoff(first=2.0, cap=60.0)
        self.forges: dict[str, Forge] = {}
        for link, token in links:
            api, repository = link.api_target()
            self.forges[link.name] = forge_for(link.provider, api, repository, token, client)
        self._trackers: dict[str, Experiment] = {}

    def run(self) -> None:
        """Check every `seconds` until stopped."""
        while not self.stopping.wait(self.seconds):
            try:
                self.check()
            except Exception as exc:  # the thread must not die; the rows stay in the outbox
                self.failures.failed("report results", exc, f"trying again in {self.seconds:g} s")
            else:
                self.failures.succeeded("report results")

    def check(self) -> int:
        """One pass over the rows due; returns how many moved on."""
        moved = 0
        runs: dict[str, list[Any]] = {}
        for row in self.outbox.due_reports():
            if row.link not in self.forges:
                self.outbox.update_report(
                    row, phase="gave_up", last_error="the link has no API token now"
                )
                continue
            what = f"report {row.sha[:7]} of {row.link}"
            try:
                moved += self.advance(row, runs)
            except ForgeError as exc:
                self._failed(row, exc)
            except Exception as exc:  # one row's trouble must not hold up the others
                self.failures.failed(what, exc, "trying again in 5 s")
                self.outbox.update_report(row, next_at=time.time() + 5)
            else:  # its failures not yet counted are, and it is forgotten
                self.failures.succeeded(what)
        return moved

    def _failed(self, row: Report, exc: ForgeError) -> None:
        attempts = row.attempts + 1
        error = shorten(str(exc), 2000)
        if exc.permanent or attempts >= MAX_ATTEMPTS:
            logger.error(
                "Link %s: %s did not take the result for %s (%s); giving up. Check the token's "
                "scope (README: results on the commit)",
                row.link,
                self.forges[row.link].provider,
                row.sha[:7],
                exc,
            )
            if row.phase == "queued":  # the pending status is a courtesy; the result is not
                self.outbox.update_report(row, phase="pending", attempts=0, last_error=error)
            else:
                self.outbox.update_report(row, phase="gave_up", attempts=attempts, last_error=error)
            return
        delay = self.backoff.after(attempts)
        logger.warning(
            "Link %s: posting the result for %s failed (%s); retrying in %.0f s",
            row.link,
            row.sha[:7],
            exc,
            delay,
        )
        self.outbox.update_report(
            row, attempts=attempts, next_at=time.time() + delay, last_error=error
        )

    def advance(self, row: Report, runs: dict[str, list[Any]]) -> int:
        """Move one row on by one phase (or more); returns 1 if it moved."""
        forge, where = self.forges[row.link], context(row.link, row.kind)
        if row.phase == "queued":
            what = f"preview of PR #{row.pr}" if row.kind == PREVIEW_TRIGGER else "output version"
            forge.set_status(row.sha, Status("pending", f"Queued: generating the {what}", where))
            self.outbox.update_report(row, phase="pending", attempts=0)
            return 1
        if row.phase == "pending":
            if row.link not in runs:
                runs[row.link] = self._flow_runs(row.link)
            result = self.outcome(row, runs[row.link])
            if result is None and time.time() - row.created_at <= GIVE_UP_SECONDS:
                self.outbox.update_report(row, next_at=time.time() + self.seconds)
                return 0
            no_run = {"state": "error", "description": "No run started for this push within a day"}
            row = self.outbox.update_report(row, phase="final", result=result or no_run, attempts=0)
        result = row.result or {}
        status = Status(result["state"], result["description"], where, result.get("target_url"))
        forge.set_status(row.sha, status)
        if row.kind == PREVIEW_TRIGGER and row.pr is not None and result.get("comment"):
            key = f"comment:{row.link}:{row.pr}"
            known = self.outbox.get_state(key)
            comment_id = forge.upsert_comment(
                row.pr, marker(row.link), result["comment"], int(known) if known else None
            )
            self.outbox.set_state(key, str(comment_id))
        self.outbox.update_report(row, phase="done")
        state, description = result["state"], result["description"]
        logger.info("Link %s: %s status of %s: %s", row.link, state, row.sha[:7], description)
        return 1

    # Outcomes

    def _flow_runs(self, link: str) -> list[Any]:
        deployment_id = self.deployments.get(link)
        if deployment_id is None:
            return []
        with queries.client() as api:
            return queries.flow_runs(api, deployment_id)

    def _tracker(self, link: str) -> Any:
        if link not in self._trackers:
            self._trackers[link] = Experiment.for_repo(self.links[link].url, create=False)
        return self._trackers[link]

    def outcome(self, row: Report, runs: list[Any]) -> dict[str, Any] | None:
        """The final status of a row's push once its flow run ended; None while it has not."""
        # The newest: a retry of a crashed run comes after it.
        run = next((r for r in runs if _is_for(r, row)), None)
        if run is None or run.state is None or run.state.type.value in queries.NOT_FINAL:
            return None
        kind, message = run.state.type.value, run.state.message or ""
        crashed = kind == "CRASHED" and self.reap and RETRIED_TAG not in run.tags
        if crashed and time.time() - run.state.timestamp.timestamp() < CRASH_GRACE_SECONDS:
            return None  # the reaper retries it (or marks it) first
        record = self._record(row, run)
        if record is None:
            if message.startswith((SKIPPED, SUPERSEDED)):
                return {"state": "success", "description": message}
            return {"state": "failure", "description": f"Failed: {message or kind.lower()}"}
        return self._from_record(row, record)

    def _record(self, row: Report, run: Any) -> Any | None:
        """The MLflow run of a flow run; None when it made none (a run cancelled while it
        waited, or a repository whose experiment does not exist yet)."""
        try:
            tracker = self._tracker(row.link)
        except TextgenError:
            return None
        found = versions.of_flow_run(tracker, run.id)
        return found[0] if found else None

    def _from_record(self, row: Report, record: Any) -> dict[str, Any]:
        tracker = self._tracker(row.link)
        tags = record.data.tags
        outcome = tags.get(T.OUTCOME)
        url = tracker.url(record.info.run_id)
        gated = failed_gates(tags)
        if outcome == T.NEW:
            version = tags.get(T.VERSION)
            if gated:
                return _result("failure", f"Version {version} recorded, gated: {gated}", url)
            return _result("success", f"Version {version} recorded", url)
        if outcome == T.REUSED:
            version = tags.get(T.REUSED_VERSION)
            if gated:
                return _result("failure", f"Already version {version}, gated: {gated}", url)
            return _result("success", f"Already version {version} (same commit and settings)", url)
        if outcome == T.SKIPPED:
            return _result("success", f"Skipped: {tags.get(T.SKIP_REASON, '')}", url)
        if outcome == T.PREVIEW:
            link = self.links[row.link]
            base = versions.latest_version(tracker, link.branch)
            assert row.pr is not None
            comment, summary = preview_comment(
                link.url, link.branch, row.pr, row.sha, record, base, url, gated
            )
            if gated:
                return _result("failure", f"Preview gated: {gated}", url, comment)
            return _result("success", f"Preview: {summary}", url, comment)
        reason = tags.get(T.FAILURE) or record.info.status
        note = failed_preview_comment(row.sha, reason, url) if row.kind == PREVIEW_TRIGGER else None
        return _result("failure", f"Failed: {reason}", url, note)


def _is_for(run: Any, row: Report) -> bool:
    params = run.parameters or {}
    if queries.commit_of(run) != row.sha:
        return False
    if row.kind == PREVIEW_TRIGGER:
        pull = params.get("pull_request") or {}
        return params.get("trigger") == PREVIEW_TRIGGER and pull.get("number") == row.pr
    return params.get("trigger") != PREVIEW_TRIGGER


def _result(
    state: str, description: str, url: str | None = None, comment: str | None = None
) -> dict[str, Any]:
    return {"state": state, "description": description, "target_url": url, "comment": comment}

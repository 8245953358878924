"""The poller: for remotes that send no webhook, notices new commits and queues the same push;
on start, it also catches up on a branch that moved while nothing listened."""

from __future__ import annotations

import logging
import threading

from deployments.service.outbox import Outbox
from deployments.service.providers import PushEvent
from deployments.service.repair import Failures
from tasks.names import POLL
from tasks.repo import RepoLocation

logger = logging.getLogger(__name__)


class Poller(threading.Thread):
    """For remotes that send no webhook: notices new commits and emits the same event."""

    def __init__(self, repo: RepoLocation, branch: str, outbox: Outbox, seconds: float) -> None:
        super().__init__(name="textgen-poller", daemon=True)
        self.repo = repo
        self.branch = branch
        self.outbox = outbox
        self.failures = Failures("poller", outbox, repo.redact)
        self.seconds = seconds
        self.stopping = threading.Event()

    def tip(self) -> str | None:
        """The branch's tip on the remote, or None if it has no such branch."""
        import git

        out = git.Git().execute(
            ["git", "ls-remote", self.repo.url, f"refs/heads/{self.branch}"],
            env=self.repo.git_env(),
            kill_after_timeout=60,
        )
        for line in str(out).splitlines():
            sha, _, ref = line.partition("\t")
            if ref == f"refs/heads/{self.branch}":
                return sha.strip()
        return None

    def check(self) -> str | None:
        """Compare the tip with the last one seen; enqueue a push when it moved. Returns the tip."""
        key = f"poll:{self.repo.url}:{self.branch}"
        tip = self.tip()
        last = self.outbox.get_state(key)
        if tip is None or tip == last:
            return tip
        if last is None:
            logger.info("Polling %s@%s from %s on", self.repo.url, self.branch, tip[:7])
        else:
            status = self._enqueue_move("poll", last, tip)
            logger.info("Poll: %s moved %s -> %s (%s)", self.branch, last[:7], tip[:7], status)
        self.outbox.set_state(key, tip)
        return tip

    def _enqueue_move(self, provider: str, before: str, tip: str) -> str:
        """Queue the branch's move from `before` to `tip` as a push; returns the outbox status."""
        push = PushEvent(
            provider=provider,
            delivery=f"{provider}-{tip}",
            ref=f"refs/heads/{self.branch}",
            after=tip,
            before=before,
            changed_paths=None,
            trigger=POLL,
        )
        return self.outbox.enqueue(push, self.repo, self.branch)[0]

    def catch_up(self) -> str | None:
        """On start: if the branch moved while nothing was listening (a push the hook or the
        provider could not deliver), queue its tip as a push, when a push was accepted here
        before (a first start runs nothing by itself). Returns the status, if queued."""
        last = self.outbox.latest(self.repo, self.branch)
        if last is None:
            return None
        tip = self.tip()
        if tip is None or tip == last:
            return None
        status = self._enqueue_move("startup", last, tip)
        logger.info(
            "%s moved %s -> %s while nothing listened: %s", self.branch, last[:7], tip[:7], status
        )
        return status

    def run(self) -> None:
        """Check every `seconds` until stopped."""
        while not self.stopping.is_set():
            what = f"poll {self.repo.url}"
            try:
                self.check()
            except Exception as exc:  # the thread must not die; the next poll tries again
                self.failures.failed(what, exc, f"trying again in {self.seconds:g} s")
            else:
                self.failures.succeeded(what)
            self.stopping.wait(self.seconds)

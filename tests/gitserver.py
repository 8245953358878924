"""A git remote over HTTP on 127.0.0.1 that demands Basic credentials (git's dumb protocol)."""

from __future__ import annotations

import base64
import functools
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _AuthHandler(SimpleHTTPRequestHandler):
    expected = ""
    seen: list[str]

    def do_GET(self) -> None:
        header = self.headers.get("Authorization", "")
        self.seen.append(header)
        if header != f"Basic {base64.b64encode(self.expected.encode()).decode()}":
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        return


@contextmanager
def serve_repo(
    work_repo: Path, bare_dir: Path, credentials: str
) -> Iterator[tuple[str, list[str]]]:
    """Serve a bare copy of `work_repo` at http://127.0.0.1:PORT/repo.git; yield (url, headers).

    `sync` publishes commits made later in `work_repo`.
    """
    bare = bare_dir / "repo.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work_repo), str(bare)], check=True)
    subprocess.run(["git", "update-server-info"], cwd=bare, check=True)
    seen: list[str] = []
    handler = type("Handler", (_AuthHandler,), {"expected": credentials, "seen": seen})
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(bare_dir))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/repo.git", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def sync(work_repo: Path, bare_dir: Path) -> None:
    """Push `main` of the working repository to the served bare copy."""
    bare = bare_dir / "repo.git"
    subprocess.run(["git", "push", "--quiet", str(bare), "main"], cwd=work_repo, check=True)
    subprocess.run(["git", "update-server-info"], cwd=bare, check=True)

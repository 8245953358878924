"""A local HTTP double of a provider's REST API (GitHub, Gitea or GitLab) for the contract tests.

It answers the commit status and pull-request comment operations textgen uses, keeps what they
did (statuses per commit, comments per pull request), and checks every request against the
provider's published API description kept in tests/data/providers/api_contracts.json: method
and path, the auth header, query parameters, and body fields with their types. A request that
does not match is answered 422 and kept in `violations`.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

CONTRACTS = Path(__file__).parent / "data" / "providers" / "api_contracts.json"
PREFIX = {"github": "", "gitea": "/api/v1", "gitlab": "/api/v4"}
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def contracts() -> dict[str, Any]:
    return dict(json.loads(CONTRACTS.read_text()))


def _template(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(path)) + "$")


def check_request(
    provider: str,
    method: str,
    path: str,
    query: list[tuple[str, str]],
    headers: dict[str, str],
    body: Any,
) -> tuple[str | None, list[str]]:
    """The operation a request is, and how it breaks the provider's API description."""
    contract = contracts()[provider]
    problems: list[str] = []
    operation = next(
        (
            op
            for op in contract["operations"]
            if op["method"] == method and _template(op["path"]).match(path)
        ),
        None,
    )
    if operation is None:
        return None, [f"{method} {path} is no operation of the {provider} description"]
    auth = contract["auth"]
    value = {k.lower(): v for k, v in headers.items()}.get(auth["header"].lower())
    if value is None:
        problems.append(f"no {auth['header']} header")
    elif not re.match(auth["pattern"], value):
        problems.append(f"{auth['header']} header is not of the form {auth['pattern']}")
    for name, raw in query:
        kind = operation["query"].get(name)
        if kind is None:
            problems.append(f"query parameter {name!r} is not in the description")
        elif kind == "integer" and not raw.isdigit():
            problems.append(f"query parameter {name!r} must be an integer, got {raw!r}")
    schema = operation["body"]
    if schema is None:
        if body not in (None, b""):
            problems.append(f"{operation['id']} takes no body")
        return operation["id"], problems
    if not isinstance(body, dict):
        return operation["id"], [*problems, f"{operation['id']} needs a JSON object body"]
    for name in schema["required"]:
        if name not in body:
            problems.append(f"body field {name!r} is required")
    for name, item in body.items():
        spec = schema["properties"].get(name)
        if spec is None:
            problems.append(f"body field {name!r} is not in the description")
            continue
        if item is None:
            if not spec.get("nullable"):
                problems.append(f"body field {name!r} may not be null")
            continue
        types = _TYPES[spec["type"]]
        if not isinstance(item, types) or (spec["type"] != "boolean" and isinstance(item, bool)):
            problems.append(f"body field {name!r} must be a {spec['type']}, got {item!r}")
        elif "enum" in spec and item not in spec["enum"]:
            problems.append(f"body field {name!r} = {item!r} is not one of {spec['enum']}")
        elif "maxLength" in spec and len(item) > spec["maxLength"]:
            problems.append(f"body field {name!r} is longer than {spec['maxLength']}")
    return operation["id"], problems


@dataclass
class Recorded:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: Any
    operation: str | None
    problems: list[str]


@dataclass
class ForgeDouble:
    """The double of one provider, on 127.0.0.1."""

    provider: str
    requests: list[Recorded] = field(default_factory=list)
    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    comments: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Comment id -> {"number", "body", "edits"}."""
    fail_next: list[int] = field(default_factory=list)
    """Status codes to answer the next requests with (a provider having a bad moment)."""

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.next_id = 1000
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def api_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{PREFIX[self.provider]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def violations(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.problems]

    def operations(self) -> set[str]:
        with self.lock:
            return {r.operation for r in self.requests if r.operation and not r.problems}

    def pr_comments(self, number: int) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(c, id=i) for i, c in self.comments.items() if c["number"] == number]

    def last_status(self, sha: str) -> dict[str, Any] | None:
        with self.lock:
            found = self.statuses.get(sha)
            return dict(found[-1]) if found else None

    def _answer(self, method: str, path: str, query: list[tuple[str, str]], body: Any) -> Any:
        """(status, JSON) for a request that met the description."""
        parts = path.strip("/").split("/")
        if "statuses" in parts:
            sha = parts[-1]
            self.statuses.setdefault(sha, []).append(dict(body))
            return 201, {"id": sum(len(v) for v in self.statuses.values()), **body}
        if self.provider == "gitlab":
            number = int(parts[parts.index("merge_requests") + 1])
            note = int(parts[-1]) if parts[-1] != "notes" else None
        elif parts[-2] == "comments":  # .../issues/comments/{id}
            number, note = -1, int(parts[-1])
        else:  # .../issues/{n}/comments
            number, note = int(parts[-2]), None
        if method == "GET":
            page = int(dict(query).get("page", "1"))
            items = [
                {"id": i, "body": c["body"]}
                for i, c in self.comments.items()
                if c["number"] == number
            ]
            return 200, items if page == 1 else []
        if method == "POST":
            self.next_id += 1
            new_id = self.next_id
            self.comments[new_id] = {"number": number, "body": body["body"], "edits": 0}
            return 201, {"id": new_id, "body": body["body"]}
        if note is None or note not in self.comments:
            return 404, {"message": "Not Found"}
        self.comments[note]["body"] = body["body"]
        self.comments[note]["edits"] += 1
        return 200, {"id": note, "body": body["body"]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                path = url.path.removeprefix(PREFIX[double.provider])
                query = parse_qsl(url.query, keep_blank_values=True)
                operation, problems = check_request(
                    double.provider, self.command, path, query, dict(self.headers), body
                )
                with double.lock:
                    double.requests.append(
                        Recorded(
                            self.command, path, query, dict(self.headers), body, operation, problems
                        )
                    )
                    if problems:
                        status, answer = 422, {"message": "; ".join(problems)}
                    elif double.fail_next:
                        status = double.fail_next.pop(0)
                        answer = {"message": "try again later"}
                    else:
                        status, answer = double._answer(self.command, path, query, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = _serve

        return Handler

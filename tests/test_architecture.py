"""The shape of the house: every import (at module level or inside a function) follows the
dependency rule of `deployments/__init__.py`, no modules import each other in a cycle, and each
piece of infrastructure has one owner (settings, the outbox's SQLite, HTML, pipeline calls)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "deployments")
MAX_LINES = 600

TOP_LEVEL = {"flows", "tasks"}


def _written_rule() -> dict[str, set[str]]:
    """Each room and the rooms it may import (its own included), as deployments/__init__.py
    writes the rule: `room → room, room, ...`."""
    text = (ROOT / "deployments" / "__init__.py").read_text()

    def room(name: str) -> str:
        return name if name in TOP_LEVEL else f"deployments.{name}"

    rule = {"deployments": {"deployments"}}
    for source, targets in re.findall(r"^ {4}(\w+) +→ ([^\n]*)$", text, flags=re.M):
        allowed = re.sub(r"\(.*\)", "", targets).replace(",", " ").split()
        rule[room(source)] = {room(source), *(room(t) for t in allowed)}
    return rule


ALLOWED = _written_rule()


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """The project's modules `module` imports, anywhere in it."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for name in names:
            target = _resolve(name)
            if target and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _room(module: str) -> str:
    return max(
        (room for room in ALLOWED if module == room or module.startswith(room + ".")), key=len
    )


def test_every_import_follows_the_dependency_rule() -> None:
    broken = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if _room(target) not in ALLOWED[_room(module)]
    ]
    assert broken == []


def test_the_dependency_rule_is_the_one_written_down() -> None:
    assert ALLOWED["deployments.reports"] == {"deployments.reports", "tasks"}
    assert ALLOWED["deployments.ops"] == {"deployments.ops", "tasks"}
    assert ALLOWED["deployments.orchestration"] == {"deployments.orchestration", "flows", "tasks"}
    assert ALLOWED["flows"] == {"flows", "tasks"} and ALLOWED["tasks"] == {"tasks"}
    assert "deployments.service" in ALLOWED["deployments.cli"]
    assert "deployments.cli" not in ALLOWED["deployments.service"]


def test_no_modules_import_each_other_in_a_cycle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_a_grab_bag(module: str) -> None:
    lines = MODULES[module].read_text().count("\n") + 1
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by who reads it"


def _strings(module: str) -> list[str]:
    tree = ast.parse(MODULES[module].read_text())
    return [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def test_settings_are_named_in_the_registry_alone() -> None:
    naming = {
        module
        for module in MODULES
        if any(re.fullmatch(r"TEXTGEN_[A-Z0-9_]+", text) for text in _strings(module))
    }
    assert naming == {"tasks.config"}


def test_the_outbox_owns_its_sqlite_file() -> None:
    def imports_sqlite(module: str) -> bool:
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if isinstance(node, ast.Import) and any(a.name == "sqlite3" for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and node.module == "sqlite3":
                return True
        return False

    assert {module for module in MODULES if imports_sqlite(module)} == {
        "deployments.service.outbox"
    }


def test_html_comes_from_templates() -> None:
    markup = re.compile(r"<(html|table|tr|td|div|details|summary|svg|circle|h[1-6])\b", re.I)
    assert [m for m in MODULES if any(markup.search(text) for text in _strings(m))] == []


def test_the_pipeline_is_called_through_its_public_api() -> None:
    private = (
        "_sanitize_parameters",
        "_preprocess_params",
        "_forward_params",
        "_postprocess_params",
    )
    assert [m for m in MODULES if any(p in MODULES[m].read_text() for p in private)] == []


def test_each_exit_code_and_each_tag_means_one_thing() -> None:
    import inspect

    from tasks import errors, names, tags

    codes = [
        cls.__dict__["exit_code"]
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if "exit_code" in cls.__dict__
    ]
    assert sorted(codes) == list(range(1, len(codes) + 1)), "each exit code once, no gaps"
    keys = [v for k, v in vars(tags).items() if k.isupper() and "." in v]
    assert len(keys) == len(set(keys)), "two tag names for one MLflow tag"
    events = [names.PUSH_EVENT, names.PULL_REQUEST_EVENT]
    triggers = [names.MANUAL, names.PUSH, names.POLL, names.PREVIEW_TRIGGER]
    assert len(set(events)) == 2 and len(set(triggers)) == 4

"""Quality gates: thresholds on a run's recorded metrics, from the repository at the commit.

An optional `gates:` list, in `textgen.yaml` or at the top of a workflow spec
(`.gradient/workflows/*.yaml`); every gate of both applies:

```yaml
gates:
  - distinct_2 >= 0.6                         # a fixed threshold
  - repetition_rate <= 0.1
  - mean_log_likelihood >= base - 0.05        # not worse than the base by more than 0.05
  - tokens_per_second >= base * 0.8           # within 80% of the base
  - cell[model=gpt2].distinct_2 >= 0.6        # one cell of the matrix (tasks.evalset)
  - mean(distinct_2) >= 0.6                   # the mean over the cells
```

A metric of an evaluation set is its cell's mean over the prompts. On a matrix, a bare metric
is the mean over the cells, as `mean(...)` is; `cell[k=v,...]` names the one cell whose values
include those pairs, and a gate naming a cell the matrix does not have is an error.

`base` is the metric of the version the run is compared with: for a push, the branch's latest
version before it; for a pull-request preview, the latest version of the base branch. A gate
relative to a base that does not exist (the first version) is not checked, and says so.

A run that fails a gate is still recorded (a push still gets its version number); it is tagged
`textgen.gates=failed` with which gates failed, and its commit status says failure.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from tasks import tags as T
from tasks.bounded import load_yaml, show
from tasks.errors import SettingsError
from tasks.evalset import parse_cell_selector, select_cells
from tasks.evaluation import QUALITY
from tasks.repo import CommitInfo

GATE_METRICS = (
    *QUALITY,
    "new_tokens",
    "tokens_per_second",
    "generation_seconds",
    "load_seconds",
)
"""The recorded metrics a gate may name."""

MAX_GATES = 50
_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_RELATIVE = {"-": operator.sub, "+": operator.add, "*": operator.mul}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_GATE = re.compile(
    r"^\s*(?:cell\[(?P<cell>[^\]]*)\]\.(?P<cell_metric>[a-z_0-9]+)|mean\((?P<mean>[a-z_0-9]+)\)"
    rf"|(?P<metric>[a-z_0-9]+))\s*(?P<op>>=|<=|>|<)\s*"
    rf"(?:(?P<number>{_NUMBER})|base(?:\s*(?P<rel>[-+*])\s*(?P<amount>{_NUMBER}))?)\s*$"
)
ALLOWED = (
    "`METRIC OP VALUE` where OP is >=, <=, > or <, and VALUE is a number, `base`, "
    "`base - x`, `base + x` or `base * x`; METRIC is a metric, `mean(metric)` or "
    "`cell[key=value,...].metric`"
)


@dataclass(frozen=True)
class Gate:
    """One threshold on one metric."""

    metric: str
    op: str
    number: float | None = None
    rel: str | None = None
    """For a gate relative to the base: `-`, `+` or `*` (None: the base itself)."""
    amount: float = 0.0
    source: str = ""
    cell: str | None = None
    """The cell a gate names (`cell[...]`), as written; `resolve_cells` makes it the cell's name."""
    mean: bool = False
    """A gate on the mean over the cells (`mean(...)`)."""

    @property
    def relative(self) -> bool:
        return self.number is None

    @property
    def target(self) -> str:
        """What the gate reads: `metric`, `mean(metric)` or `cell[name].metric`."""
        if self.cell is not None:
            return f"cell[{self.cell}].{self.metric}"
        return f"mean({self.metric})" if self.mean else self.metric

    def text(self) -> str:
        if not self.relative:
            return f"{self.target} {self.op} {self.number:g}"
        tail = f" {self.rel} {self.amount:g}" if self.rel else ""
        return f"{self.target} {self.op} base{tail}"

    def threshold(self, base: float | None) -> float | None:
        """The value the metric is compared with; None when it needs a base there is not."""
        if not self.relative:
            return self.number
        if base is None or not math.isfinite(base):
            return None
        relative = _RELATIVE.get(self.rel or "")
        return base if relative is None else relative(base, self.amount)


@dataclass(frozen=True)
class GateResult:
    """How one gate went for one run."""

    gate: str
    metric: str
    value: float | None
    threshold: float | None
    passed: bool
    checked: bool
    note: str

    def line(self) -> str:
        """`distinct_2 = 0.41, needs >= 0.6`, for statuses and comments."""
        return self.note


def parse_gate(text: Any, source: str) -> Gate:
    """One gate from its text; a clear error naming the file and what is allowed."""
    if not isinstance(text, str):
        raise SettingsError(f"{source}: gate {show(text)} is not text; expected {ALLOWED}")
    match = _GATE.match(text)
    if match is None:
        raise SettingsError(f"{source}: gate {show(text)} is not understood; expected {ALLOWED}")
    cell = match.group("cell")
    metric = match.group("metric") or match.group("cell_metric") or match.group("mean")
    if cell is not None:
        try:
            parse_cell_selector(cell)
        except ValueError as exc:
            raise SettingsError(f"{source}: gate {show(text)}: cell[...]: {exc}") from None
    if metric not in GATE_METRICS:
        raise SettingsError(
            f"{source}: gate {show(text)} names the unknown metric {metric!r}; "
            f"allowed: {', '.join(GATE_METRICS)}"
        )
    number, amount = (None if v is None else float(v) for v in match.group("number", "amount"))
    if any(v is not None and not math.isfinite(v) for v in (number, amount)):
        raise SettingsError(f"{source}: gate {show(text)} has a value that is not finite")
    amount = 0.0 if amount is None else amount
    rel = match.group("rel")
    mean = match.group("mean") is not None
    return Gate(metric, match.group("op"), number, rel, amount, source, cell, mean)


def parse_gates(value: Any, source: str) -> list[Gate]:
    """The `gates:` value of a file: a list of gate texts (or one)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise SettingsError(f"{source}: `gates` must be a list of gates, each {ALLOWED}")
    if len(items) > MAX_GATES:
        raise SettingsError(f"{source}: {len(items)} gates; allowed: at most {MAX_GATES}")
    return [parse_gate(item, source) for item in items]


def load_gates(commit: CommitInfo) -> list[Gate]:
    """Every gate at the commit: `textgen.yaml`'s, then each workflow spec's."""
    from tasks.triggers import workflow_files

    gates: list[Gate] = []
    for path in ["textgen.yaml", *workflow_files(commit)]:
        text = commit.read_file(path)
        source = f"{path} at commit {commit.short_sha}"
        doc = None if text is None else load_yaml(text, source)
        if isinstance(doc, dict):
            gates += parse_gates(doc.get("gates"), source)
    return gates


def resolve_cells(gates: list[Gate], cells: list[str]) -> list[Gate]:
    """The gates with each `cell[...]` made the name of the one cell it selects; a named error
    for a gate whose cell the version does not have, or that fits several."""
    resolved = []
    for gate in gates:
        if gate.cell is not None:
            if cells == [""]:
                raise SettingsError(
                    f"{gate.source}: gate {gate.text()!r} names a cell, and the settings have "
                    "no matrix"
                )
            found = select_cells(cells, parse_cell_selector(gate.cell))
            if len(found) != 1:
                what = "no cell" if not found else f"{len(found)} cells"
                raise SettingsError(
                    f"{gate.source}: gate {gate.text()!r} fits {what} of the matrix; "
                    f"cells: {'; '.join(cells)}"
                )
            gate = replace(gate, cell=found[0])
        resolved.append(gate)
    return resolved


def gate_values(per_cell: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """What gates read of a version, by `Gate.target`: each cell's metrics, their means over the
    cells, and the bare metrics (the one cell's, or the means)."""
    values: dict[str, float] = {}
    names = sorted({name for metrics in per_cell.values() for name in metrics})
    for cell, metrics in per_cell.items():
        for name, value in metrics.items():
            values[f"cell[{cell}].{name}"] = value
    for name in names:
        found = [m[name] for m in per_cell.values() if name in m and math.isfinite(m[name])]
        if found:
            values[f"mean({name})"] = values[name] = sum(found) / len(found)
    return values


def evaluate(
    gates: list[Gate], metrics: Mapping[str, float], base: Mapping[str, float] | None
) -> list[GateResult]:
    """Check each gate against the run's metrics (and the base's, for relative gates)."""
    results = []
    for gate in gates:
        value = metrics.get(gate.target)
        threshold = gate.threshold(None if base is None else base.get(gate.target))
        if value is None or not math.isfinite(value):
            value, passed, checked = None, False, True
            note = f"{gate.target} was not recorded, needs {gate.op} {_fmt(threshold)}"
        elif threshold is None:
            passed, checked = True, False
            note = f"{gate.target} = {_fmt(value)}: not checked, no base version to compare with"
        else:
            passed, checked = _OPERATORS[gate.op](value, threshold), True
            note = f"{gate.target} = {_fmt(value)}, needs {gate.op} {_fmt(threshold)}"
            if gate.relative:
                note += f" ({gate.text()})"
        results.append(
            GateResult(gate.text(), gate.target, value, threshold, passed, checked, note)
        )
    return results


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def gate_tags(results: list[GateResult]) -> dict[str, str]:
    """The MLflow tags that record the gates' outcome (none when there were no gates)."""
    if not results:
        return {}
    failed = [r for r in results if not r.passed]
    tags = {
        T.GATES: "failed" if failed else "passed",
        T.GATES_REPORT: json.dumps([asdict(r) for r in results])[:5000],
    }
    if failed:
        tags[T.GATES_FAILED] = "; ".join(r.line() for r in failed)[:5000]
    return tags


def failed_gates(tags: Mapping[str, str]) -> str | None:
    """The failed gates a run's tags record, or None when it passed or had none."""
    if tags.get(T.GATES) != "failed":
        return None
    return tags.get(T.GATES_FAILED) or "a quality gate failed"

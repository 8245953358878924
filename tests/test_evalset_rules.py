"""The rules of evaluation sets without a model: matrices as GitHub Actions expands them,
prompt ids, limits, and gates on cells and means."""

from __future__ import annotations

import pytest

from tasks.errors import SettingsError
from tasks.evalset import cell_key, expand_matrix, prompt_id, select_cells
from tasks.gates import evaluate, gate_values, parse_gates, resolve_cells


def keys(value: object, limit: int = 64) -> list[str]:
    return [cell_key(c) for c in expand_matrix(value, "textgen.yaml", limit)]


def test_a_matrix_is_every_combination_first_axis_slowest() -> None:
    assert keys({"model": ["a", "b"], "random_seed": [42, 7]}) == [
        "model=a,random_seed=42",
        "model=a,random_seed=7",
        "model=b,random_seed=42",
        "model=b,random_seed=7",
    ]
    assert keys(None) == [""]


def test_exclude_and_include_follow_github_actions() -> None:
    matrix = {
        "model": ["a", "b"],
        "random_seed": [42, 7],
        "exclude": [{"model": "b", "random_seed": 7}],
        # fits every model=a cell: added to them; fits none: a cell of its own
        "include": [{"model": "a", "temperature": 0.7}, {"model": "c", "random_seed": 1}],
    }
    assert keys(matrix) == [
        "model=a,random_seed=42,temperature=0.7",
        "model=a,random_seed=7,temperature=0.7",
        "model=b,random_seed=42",
        "model=c,random_seed=1",
    ]
    # an include that only adds keys is added to every cell
    assert keys({"random_seed": [1, 2], "include": [{"top_k": 5}]}) == [
        "random_seed=1,top_k=5",
        "random_seed=2,top_k=5",
    ]


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        ({"random_seed": list(range(100)), "top_k": list(range(100))}, "10000 cells; allowed"),
        ({"random_seed": [1, 2, 3], "top_k": [1, 2]}, "6 cells; allowed: at most 5"),
        ({"initial_sentence": ["a", "b"]}, "prompts:"),
        ({"colour": [1]}, "unknown key 'colour'"),
        ({"random_seed": []}, "non-empty list"),
        ({"random_seed": [1, 1]}, "twice"),
        ({"model": ["a,b"]}, "may not hold"),
        ({"random_seed": [1], "exclude": [{"top_k": 1}]}, "not an axis"),
        ({"random_seed": [1], "exclude": [{"random_seed": 1}]}, "no cells left"),
        ([1, 2], "must map settings"),
    ],
)
def test_bad_matrices_are_named_errors(matrix: object, match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        expand_matrix(matrix, "textgen.yaml", 5)


def test_prompt_ids_follow_the_text() -> None:
    assert prompt_id("Hello") == prompt_id("Hello") != prompt_id("Hello ")
    assert prompt_id("Hello").startswith("p") and len(prompt_id("Hello")) == 11


def test_cells_are_selected_by_their_pairs() -> None:
    cells = ["model=a,random_seed=42", "model=a,random_seed=7", "model=b,random_seed=42"]
    assert select_cells(cells, {"model": "b"}) == ["model=b,random_seed=42"]
    assert select_cells(cells, {"model": "a"}) == cells[:2]
    assert select_cells(cells, {"model": "z"}) == []


def test_gates_read_a_cell_or_the_mean() -> None:
    per_cell = {
        "model=a,random_seed=42": {"distinct_2": 0.8},
        "model=b,random_seed=42": {"distinct_2": 0.4},
    }
    cells = list(per_cell)
    gates = resolve_cells(
        parse_gates(
            [
                "cell[model=a].distinct_2 >= 0.7",
                "cell[model=b].distinct_2 >= 0.7",
                "mean(distinct_2) >= 0.6",
                "distinct_2 >= 0.6",
                "cell[model=b].distinct_2 >= base",
            ],
            "textgen.yaml",
        ),
        cells,
    )
    base = gate_values({"model=a,random_seed=42": {"distinct_2": 0.8}})
    results = evaluate(gates, gate_values(per_cell), base)
    assert [r.passed for r in results] == [True, False, True, True, True]
    assert results[4].checked is False  # the base has no such cell
    assert results[0].gate == "cell[model=a,random_seed=42].distinct_2 >= 0.7"
    assert "cell[model=b,random_seed=42].distinct_2 = 0.4" in results[1].note


@pytest.mark.parametrize(
    ("gate", "cells", "match"),
    [
        ("cell[model=z].distinct_2 >= 0.5", ["model=a", "model=b"], "fits no cell"),
        (
            "cell[random_seed=1].distinct_2 >= 0.5",
            ["model=a,random_seed=1", "model=b,random_seed=1"],
            "fits 2 cells",
        ),
        ("cell[model=a].distinct_2 >= 0.5", [""], "no matrix"),
    ],
)
def test_a_gate_on_a_cell_there_is_not_is_a_named_error(
    gate: str, cells: list[str], match: str
) -> None:
    with pytest.raises(SettingsError, match=match):
        resolve_cells(parse_gates([gate], "textgen.yaml"), cells)


def test_a_malformed_cell_selector_is_refused() -> None:
    with pytest.raises(SettingsError, match="key=value"):
        parse_gates(["cell[model].distinct_2 >= 0.5"], "textgen.yaml")

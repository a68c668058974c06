"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py): the fixed budget and the
"one field wrong" strategy every structured input gets."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Deterministic (`derandomize`, no example database): the same examples on every run,
# so the suite's time and verdict do not drift. Modules lower max_examples per test.
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _confuse(kind: str, value: Any, scalars: st.SearchStrategy[Any],
             containers: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    if kind == "suffix" and isinstance(value, str):
        # A regex's `$` also matches before a final newline.
        return st.sampled_from(["\n", "\x00"]).map(lambda c: value + c)
    return containers if kind == "container" else scalars


def type_confused(valid: dict[str, Any], scalars: st.SearchStrategy[Any],
                  containers: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """`valid` with one field made a container or another scalar, or (a string) given
    one more character: a list or map where a string is expected must not reach a set
    lookup, and a string must be checked to its very end.

    One field at a time, because a parser stops at the first bad field: with several
    wrong at once, the later fields' checks would hardly ever run.
    """
    def one_field(name: str, kind: str) -> st.SearchStrategy[dict[str, Any]]:
        return _confuse(kind, valid[name], scalars, containers).map(
            lambda value: {**valid, name: value})

    return st.tuples(st.sampled_from(sorted(valid)),
                     st.sampled_from(["container", "scalar", "suffix"])).flatmap(
        lambda drawn: one_field(*drawn))

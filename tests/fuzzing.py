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


@st.composite
def mutated(draw: st.DrawFn, data: bytes, at_least: int = 1) -> bytes:
    """`data` with `at_least` to 3 changes: bytes flipped, the end cut off, junk
    appended (at least one byte of it when at least one change is asked for)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(at_least, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "append"]))
        if kind == "flip" and out:
            index = draw(st.integers(0, len(out) - 1))
            out[index] ^= draw(st.integers(1, 255))
        elif kind == "cut" and out:
            del out[draw(st.integers(0, len(out) - 1)):]
        else:
            out += draw(st.binary(min_size=min(at_least, 1), max_size=16))
    return bytes(out)


@st.composite
def mutated_text(draw: st.DrawFn, text: str, alphabet: str) -> str:
    """`text` with 1 to 3 characters changed, inserted or cut, or text appended; new
    characters favour `alphabet` (the ones the parser cares about), then any at all."""
    out = list(text)
    chars = st.one_of(st.sampled_from(list(alphabet)), st.characters())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["change", "cut", "append", "insert"]))
        if kind == "change" and out:
            out[draw(st.integers(0, len(out) - 1))] = draw(chars)
        elif kind == "cut" and out:
            del out[draw(st.integers(0, len(out) - 1)):]
        elif kind == "insert":
            out.insert(draw(st.integers(0, len(out))), draw(chars))
        else:
            out += draw(st.text(min_size=1, max_size=16))
    return "".join(out)

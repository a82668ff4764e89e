"""Shared fuzzing machinery: the hypothesis profiles and mutation strategies for untrusted bytes.

Two kinds of input reach every decoder:

- raw random bytes (:func:`raw_bytes`), which mostly test the first few checks;
- structure-aware mutations (:func:`mutated`, :func:`json_mutated`) of *valid* encodings made
  by the project's own encoders: byte flips, truncations, insertions, splices of hostile JSON
  tokens (NaN, Infinity, 2**63+5, 2**64, 4301-digit numbers, deep nesting, long strings,
  lone surrogates, non-UTF-8), and JSON-tree edits that replace, drop, add or wrap a value.

:func:`expect_only` runs a decoder and lets exactly its typed error through, so a test fails
with the falsifying input on any other exception.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES = 200
"""Examples per test in CI (derandomized)."""
SOAK_EXAMPLES = 3000
"""Examples per test with ``pytest --soak``."""
DEADLINE = timedelta(seconds=2)
"""Per-example time limit: a decoder slower than this on a bounded input counts as a hang."""
MAX_RAW = 4096
"""Largest raw random input; structure-aware inputs grow from their valid base."""

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.large_base_example]  # fmt: skip

settings.register_profile(
    "microgrid-fuzz",
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=DEADLINE,
    print_blob=True,
    suppress_health_check=_HEALTH,
)
settings.register_profile(
    "microgrid-fuzz-soak",
    max_examples=SOAK_EXAMPLES,
    derandomize=False,
    deadline=DEADLINE,
    print_blob=True,
    suppress_health_check=_HEALTH,
)

_mode: dict[str, Any] = {"profile": "microgrid-fuzz", "examples": None}


def configure(*, soak: bool, examples: int | None) -> None:
    """Choose the profile (called by the directory's conftest when pytest starts)."""
    _mode["profile"] = "microgrid-fuzz-soak" if soak else "microgrid-fuzz"
    _mode["examples"] = examples


def describe() -> str:
    """One line for the pytest header: profile, examples, how to replay a failure."""
    profile = settings.get_profile(_mode["profile"])
    examples = _mode["examples"] or profile.max_examples
    replay = (
        "failures print @reproduce_failure and --hypothesis-seed"
        if not profile.derandomize
        else "derandomized: rerun the test to replay"
    )
    return f"hypothesis profile {_mode['profile']}, {examples} examples per test ({replay})"


def fuzz_settings(scale: float = 1.0) -> settings:
    """The active fuzz profile; ``scale`` shrinks the example count of slow tests."""
    profile = settings.get_profile(_mode["profile"])
    examples = _mode["examples"] or profile.max_examples
    return settings(profile, max_examples=max(1, int(examples * scale)))


E = TypeVar("E", bound=BaseException)
T = TypeVar("T")


def expect_only(decode: Callable[[Any], T], data: Any, error: type[E] | tuple[type[E], ...]
                ) -> T | None:  # fmt: skip
    """``decode(data)``, or None if it raised ``error``; any other exception propagates."""
    try:
        return decode(data)
    except error:
        return None


# --- hostile pieces ------------------------------------------------------------------------------

HOSTILE_TOKENS: tuple[bytes, ...] = (
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1.5", b"-0", b"0.0",
    b"1E2", b"9223372036854775813", b"18446744073709551616", b"-9223372036854775809",
    b"340282366920938463463374607431768211457", b"9" * 4301, b"-" + b"9" * 5000,
    b"null", b"true", b"false", b"[]", b"{}", b'""', b'"\\ud800"', b'"\\udfff\\ud800"',
    b'"\\u0000"', b'"' + b"x" * 20_000 + b'"', b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80",
    b"\x00", b"\t\n\r ", b"[" * 3000, b"[" * 3000 + b"]" * 3000, b'{"a":' * 2000,
    b'{"a":1,"a":2}', b"\xef\xbb\xbf", b"//", b"'x'",
)  # fmt: skip
"""Byte strings that break naive JSON/varint decoders, spliced into valid encodings."""


def _deep(n: int) -> Any:
    out: Any = 0
    for _ in range(n):
        out = [out]
    return out


HOSTILE_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**63 + 5, 2**64,
    -(2**63) - 1, -(2**64), 10**40, 0.5, -0.0, 1e308, float("nan"), float("inf"),
    float("-inf"), "", " ", "x" * 10_000, "\ud800", "\x00", "é", "did:key:z", "1/0", "0/1",
    "buy", "sell", [], {}, [1, 2], {"": None}, _deep(200),
)  # fmt: skip
"""Values substituted into parsed JSON documents (dumped with NaN/Infinity allowed)."""


def hostile_values() -> st.SearchStrategy[Any]:
    """One of :data:`HOSTILE_VALUES`, deep-copied (documents are edited in place)."""
    return st.sampled_from(HOSTILE_VALUES).map(copy.deepcopy)


def raw_bytes(max_size: int = MAX_RAW) -> st.SearchStrategy[bytes]:
    """Random bytes, sometimes behind a given prefix (see :func:`prefixed`)."""
    return st.binary(max_size=max_size)


def prefixed(prefix: bytes, max_size: int = MAX_RAW) -> st.SearchStrategy[bytes]:
    """Random bytes after a valid domain prefix, so decoders get past their first check."""
    return st.binary(max_size=max_size).map(lambda b: prefix + b)


@st.composite
def mutated(draw: st.DrawFn, base: bytes, *, max_ops: int = 4) -> bytes:
    """``base`` after 1..max_ops byte-level edits (flip, truncate, insert, delete, splice)."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(
            ("flip", "set", "truncate", "insert", "delete", "token", "duplicate", "swap")
        ))  # fmt: skip
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "token":
            end = pos + draw(st.integers(0, 24))
            data[pos:end] = draw(st.sampled_from(HOSTILE_TOKENS))
        elif op == "duplicate":
            end = pos + draw(st.integers(1, 64))
            data[pos:pos] = data[pos:end]
        elif op == "swap" and data:
            j = draw(st.integers(0, len(data)))
            a, b = sorted((pos, j))
            data[a:b] = data[a:b][::-1]
    return bytes(data)


def _paths(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*path, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def edited_doc(draw: st.DrawFn, doc: Any, *, max_ops: int = 3) -> Any:
    """A deep copy of the JSON document ``doc`` with 1..max_ops tree edits."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, max_ops))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(("replace", "drop", "add", "wrap", "int", "string")))
        if not path:
            if op in ("replace", "wrap"):
                doc = draw(hostile_values()) if op == "replace" else [doc]
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if op == "replace":
            parent[key] = draw(hostile_values())
        elif op == "drop":
            del parent[key]
        elif op == "add":
            if isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(hostile_values())
            else:
                parent.insert(key, draw(hostile_values()))
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "int":
            parent[key] = draw(st.integers(-(2**70), 2**70) | st.integers(-10, 10))
        elif op == "string":
            parent[key] = draw(st.text(max_size=64))
    return doc


def dumps(doc: Any, *, canonical: bool = True) -> bytes:
    """JSON bytes of ``doc``: compact and sorted (canonical) or indented; NaN/Infinity allowed,
    lone surrogates escaped."""
    if canonical:
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps(doc, indent=1).encode()


@st.composite
def json_mutated(draw: st.DrawFn, doc: Any, prefix: bytes = b"") -> bytes:
    """``prefix`` + JSON of ``doc`` after tree edits, sometimes also byte-mutated."""
    out = prefix + dumps(draw(edited_doc(doc)), canonical=draw(st.booleans()))
    if draw(st.integers(0, 3)) == 0:
        out = draw(mutated(out, max_ops=2))
    return out


def any_of_json(doc: Any, base: bytes, prefix: bytes = b"") -> st.SearchStrategy[bytes]:
    """Raw bytes, prefixed raw bytes, byte mutations of ``base`` and JSON edits of ``doc``."""
    return st.one_of(
        raw_bytes(),
        prefixed(prefix) if prefix else raw_bytes(64),
        mutated(base),
        json_mutated(doc, prefix),
    )

"""Source files read for a traceback are released; source registered in memory is kept."""

from __future__ import annotations

import linecache
import traceback
from pathlib import Path

from node.net import source_lines


def _raise_here() -> None:
    raise ValueError("marker for the traceback")


def _formatted() -> str:
    try:
        _raise_here()
    except ValueError as exc:
        return "".join(traceback.format_exception(exc))
    raise AssertionError("unreachable")


def test_a_formatted_tracebacks_source_files_are_released_and_read_again_when_needed() -> None:
    text = _formatted()
    assert 'raise ValueError("marker for the traceback")' in text
    assert __file__ in linecache.cache

    generated = "<generated source for the test>"
    linecache.cache[generated] = (12, None, ["x = 1\n"], generated)
    try:
        dropped = source_lines.release()
        assert dropped >= len(Path(__file__).read_text().splitlines())
        assert __file__ not in linecache.cache
        assert not any(len(e) == 4 and e[1] is not None for e in linecache.cache.values())
        assert linecache.getline(generated, 1) == "x = 1\n"  # no file to read it back from
        # a later traceback still shows its source line
        assert 'raise ValueError("marker for the traceback")' in _formatted()
        assert source_lines.release() > 0
        assert source_lines.release() == 0
    finally:
        linecache.cache.pop(generated, None)

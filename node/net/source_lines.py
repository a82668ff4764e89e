"""Source lines read for tracebacks are not kept for the life of the process (issue 19: RSS).

Formatting a traceback reads every source file on it into :mod:`linecache`, whole, and keeps it
there: py-libp2p 0.8.1 formats one for each connection its swarm fails to add (a dial race, a
peer the gate refused), whether or not the warning is logged, so every node held its 3,000-line
``swarm.py`` and the other files on those tracebacks: 0.7 MiB in every node of a 25-household
grid, 1.3 MiB in a voter (tracemalloc). :func:`release` drops the entries read from files; a
later traceback reads them again (a millisecond, and tracebacks are rare). Entries registered
in memory (``attrs`` puts its generated methods' source there, with no file to read it back
from) and lazy entries are kept.
"""

from __future__ import annotations

import linecache


def release() -> int:
    """Drop the source files :mod:`linecache` read from disk; returns how many lines it held."""
    dropped = 0
    for name, entry in list(linecache.cache.items()):
        # (size, mtime, lines, fullname): read from a file; mtime None: registered in memory
        if len(entry) == 4 and entry[1] is not None and linecache.cache.pop(name, None):
            dropped += len(entry[2])
    return dropped

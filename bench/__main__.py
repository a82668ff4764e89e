"""Run every benchmark in bench/ (``python -m bench [NAME ...]``), each in its own process.

Each ``bench/<name>_bench.py`` prints its own figures and ratios against peers measured in the
same run. Benchmarks are bounded in time; a benchmark that fails is reported and the others
still run. Exit status is non-zero if any benchmark failed to run (not if it missed a target).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

TIMEOUT_S = 900


def main(argv: list[str]) -> int:
    """Run the named benchmarks (default: all) and report failures."""
    here = Path(__file__).parent
    names = argv or sorted(p.stem for p in here.glob("*_bench.py"))
    failed = []
    for name in names:
        module = name if name.endswith("_bench") else f"{name}_bench"
        print(f"\n===== {module} =====", flush=True)
        start = time.monotonic()
        try:
            rc = subprocess.run(
                [sys.executable, "-m", f"bench.{module}"], timeout=TIMEOUT_S, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
            print(f"{module}: timed out after {TIMEOUT_S} s")
        print(f"===== {module}: exit {rc} in {time.monotonic() - start:.1f} s =====", flush=True)
        if rc != 0:
            failed.append(module)
    if failed:
        print(f"\nbenchmarks that failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

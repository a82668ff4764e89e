"""``bench/node_bench.py --baseline``: a baseline run's printed results are read back and set
against this version's, per size and Raft timing."""

from __future__ import annotations

import pytest

from bench.node_bench import parse_results, report_ratios


def test_printed_results_are_read_back_with_nan_as_none() -> None:
    out = (
        "running 10 households…\n"
        "  {'n': 10, 'raft': 'production', 'leader_kb_round': 91.0, 'rss_median_mb': nan}\n"
        "  {'slot': 3, 'cleared': 0.2}\n"
        " 10 produ    64.4\n"
        "  {'n': 25, 'raft': 'production', 'error': 'TooSlowError: '}\n"
    )
    assert parse_results(out) == [
        {"n": 10, "raft": "production", "leader_kb_round": 91.0, "rss_median_mb": None},
        {"n": 25, "raft": "production", "error": "TooSlowError: "},
    ]


def test_ratios_are_this_version_over_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    base = [{"n": 10, "raft": "production", "leader_kb_round": 91.0, "cpu_round_s": 0.5},
            {"n": 25, "raft": "production", "error": "x"}]  # fmt: skip
    now = [{"n": 10, "raft": "production", "leader_kb_round": 33.0, "cpu_round_s": 0.5},
           {"n": 25, "raft": "production", "leader_kb_round": 80.0}]  # fmt: skip
    report_ratios("abc123", base, now)
    out = capsys.readouterr().out
    assert "leader kB 33/91 = x0.36" in out and "CPU/round 0.5/0.5 = x1.00" in out
    assert "N=25 production: no comparable baseline figures" in out

"""The ``microgrid`` command line: one table of commands, and light commands stay light."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from node.cli import COMMAND_MODULES, COMMANDS, build_parser, main

HEAVY = ("libp2p", "sqlalchemy", "dash", "plotly")


def registered() -> dict[str, tuple[str, str | None]]:
    """Each command the modules really register: its module and its help line."""
    out: dict[str, tuple[str, str | None]] = {}
    for module in COMMAND_MODULES:
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(subparsers)
        helps = {a.dest: a.help for a in subparsers._choices_actions}
        for name in subparsers.choices:
            out[name] = (module, helps.get(name))
    return out


def test_the_command_table_is_what_the_modules_register() -> None:
    assert registered() == {name: (m, h) for name, (m, h) in COMMANDS.items()}


def heavy_modules_after(code: str) -> list[str]:
    """Which heavy packages a fresh interpreter has imported after running ``code``."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in "\
        f"sys.modules}} & set({list(HEAVY)!r}))))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_lists_every_command_without_importing_heavy_packages() -> None:
    code = (
        "import contextlib, io\nfrom node.cli import main\nbuf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert all(name in buf.getvalue() for name in "
        f"{list(COMMANDS)!r}), buf.getvalue()\n"
    )
    assert heavy_modules_after(code) == []


def test_a_meter_command_loads_neither_libp2p_nor_sqlalchemy() -> None:
    code = (
        "import contextlib, io\nfrom node.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['meter', 'profiles']) == 0\n"
    )
    assert heavy_modules_after(code) == []


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_command_is_parsed_with_its_own_options() -> None:
    args = build_parser("ledger").parse_args(["ledger", "verify", "--db", "sqlite:///x.db"])
    assert callable(args.func)

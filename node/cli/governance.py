"""CLI: the grid operator changes a running grid (``microgrid member ...``, ``microgrid rules
...``) and anyone asks a node who the members are and which rules are in force.

Every change is one operator-signed governance record (:data:`market.models.GOVERNANCE_RECORDS`)
signed here with the operator's key file and posted to a node's ``POST /governance``, which
checks it against the engine, gossips it and answers once it is committed. The command prints
what was committed, or why it was refused (exit 1, with the engine's typed reason); exit 3 when
the node took the record but it did not commit within ``--wait`` seconds (run the same command
with the same ``--nonce`` to wait again), 2 for bad input or an unreachable node.

Operator nonces: the node hands out a fresh one (``GET /governance``): ``4 * s + k`` with ``s``
the current slot and ``k`` in 0, 1, 3 (its feeder readings use ``4 * s + 2``), so governance
records and feeder readings never share a nonce and both stay inside the operator's one
anti-replay window; the node reserves a handed-out nonce for two minutes, so concurrent calls
get different ones. ``--from-slot`` defaults to the open slot plus :data:`FROM_SLOT_MARGIN`.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from node.cli import COMMANDS

FROM_SLOT_MARGIN = 2
"""Default ``--from-slot``: this many slots after the node's open slot, so the record commits
before that slot's gate closes."""
DEFAULT_WAIT_SECONDS = 10
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_PENDING = 3
_NONCE_RETRIES = 3


class CliError(Exception):
    """A refusal to print as ``error: ...``, with the exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def register(subparsers: Any) -> None:
    """Add ``member`` and ``rules`` to the ``microgrid`` command."""
    m = subparsers.add_parser("member", help=COMMANDS["member"][1])
    ms = m.add_subparsers(dest="member_command", metavar="ACTION")
    ms.required = True

    add = _change(ms, "add", "admit a household from a slot")
    add.add_argument("--meter-serial", required=True, help="serial of its meter")
    add.add_argument("--role", required=True, choices=("learner", "voter"))
    add.add_argument("--max-power-w", type=int, default=None, help="its connection's power")
    for action, text in (
        ("remove", "the household leaves the grid for good"),
        ("suspend", "refuse the household's orders and readings"),
        ("reinstate", "a suspended household trades again"),
    ):
        _change(ms, action, text)
    role = _change(ms, "set-role", "make the household a Raft voter or learner")
    role.add_argument("--role", required=True, choices=("learner", "voter"))
    rot = _change(ms, "rotate-key", "replace the household's key (DID) by a new one")
    rot.add_argument("--new-did", required=True, help="the household's new did:key")
    rot.add_argument(
        "--old-key",
        type=Path,
        default=None,
        help="the old key file, to countersign the hand-over (if it still exists)",
    )
    rep = _change(ms, "replace-meter", "swap the household's meter from a slot")
    rep.add_argument("--meter-serial", required=True, help="serial of the new meter")
    rep.add_argument("--old-import-wh", type=int, required=True, help="old meter's final import")
    rep.add_argument("--old-export-wh", type=int, required=True, help="old meter's final export")
    rep.add_argument("--new-import-wh", type=int, default=0, help="new meter's first import")
    rep.add_argument("--new-export-wh", type=int, default=0, help="new meter's first export")
    rep.add_argument("--max-power-w", type=int, default=None, help="the new meter's power")
    ls = ms.add_parser("list", help="every household: role, meter, status and since when")
    ls.add_argument("--node", required=True, help="a node's API base URL")
    ls.add_argument("--json", action="store_true", help="print the raw document")
    ls.set_defaults(func=cmd_member_list)

    r = subparsers.add_parser("rules", help=COMMANDS["rules"][1])
    rs = r.add_subparsers(dest="rules_command", metavar="ACTION")
    rs.required = True
    st = rs.add_parser("set", help="new market rules from a slot (only the rules given change)")
    _common(st)
    st.add_argument("--retail-price", type=int, default=None, help="minor units per kWh")
    st.add_argument("--feed-in-tariff", type=int, default=None, help="minor units per kWh")
    st.add_argument(
        "--grid-fee",
        type=int,
        default=None,
        help="grid fee per kWh imported from the grid, minor units (0: none)",
    )
    st.add_argument(
        "--local-fee",
        type=int,
        default=None,
        help="grid fee per kWh bought in the local market, paid by the buyer, "
        "minor units (0: none)",
    )
    st.add_argument("--mechanism", choices=("uniform", "pay_as_bid", "mcafee"), default=None)
    st.add_argument("--k", default=None, help="k-pricing's k as n/d, e.g. 1/2")
    st.add_argument(
        "--time-of-use",
        default=None,
        help='daily periods "HH:MM=feed_in/retail,..." from 00:00 (UTC); "" returns '
        "to the flat tariffs",
    )
    st.set_defaults(func=cmd_rules_set)
    sh = rs.add_parser("show", help="the rules in force and every change")
    sh.add_argument("--node", required=True, help="a node's API base URL")
    sh.add_argument("--json", action="store_true", help="print the raw document")
    sh.set_defaults(func=cmd_rules_show)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--operator-key", type=Path, required=True, help="the operator's key file")
    p.add_argument(
        "--node", required=True, help="a node's API base URL, e.g. http://127.0.0.1:8080"
    )
    p.add_argument(
        "--from-slot",
        type=int,
        default=None,
        help=f"first slot the change is in force (default: open slot + {FROM_SLOT_MARGIN})",
    )
    p.add_argument(
        "--nonce",
        type=int,
        default=None,
        help="operator nonce (default: a fresh one from the node)",
    )
    p.add_argument(
        "--wait",
        type=int,
        default=DEFAULT_WAIT_SECONDS,
        help="seconds to wait for the commit (0..120)",
    )
    p.add_argument("--json", action="store_true", help="print the node's answer as JSON")


def _change(sub: Any, action: str, text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(action, help=text)
    _common(p)
    p.add_argument("--did", required=True, help="the household's did:key")
    p.set_defaults(func=cmd_member_change)
    return p


# --- talking to the node ---------------------------------------------------------------------


def request(
    base: str, method: str, path: str, body: bytes | None = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """One request to a node's API: ``(status, decoded JSON)``; :class:`CliError` if the node
    cannot be reached or does not answer JSON."""
    url = base.rstrip("/") + path
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.load(exc)
        except ValueError:
            return exc.code, {"error": exc.reason}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CliError(f"cannot reach the node at {base}: {exc}") from None


def _get(base: str, path: str) -> Any:
    status, doc = request(base, "GET", path)
    if status != 200:
        raise CliError(f"GET {path}: {status} {doc.get('error', doc)}", EXIT_USAGE)
    return doc


# --- building records ------------------------------------------------------------------------


def parse_time_of_use(text: str) -> tuple[Any, ...]:
    """``"00:00=8/30,07:00=10/40"`` as :class:`~market.models.TimeOfUsePeriod` records
    (``""``: none, back to the flat tariffs); :class:`CliError` for a malformed list."""
    from market.models import TimeOfUsePeriod

    periods = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            start, prices = part.split("=")
            hours, minutes = start.split(":")
            feed_in, retail = prices.split("/")
            periods.append(
                TimeOfUsePeriod(
                    start_minute=int(hours) * 60 + int(minutes),
                    feed_in_tariff=int(feed_in),
                    retail_price=int(retail),
                )
            )
        except ValueError as exc:
            raise CliError(f"--time-of-use: {part!r} is not HH:MM=feed_in/retail ({exc})") from None
    return tuple(periods)


def _record_fields(args: argparse.Namespace) -> tuple[type, dict[str, Any]]:
    """The record class and its fields (but grid, nonce, operator, from_slot) of a command."""
    from market.models import (
        AddMember,
        ChangeRole,
        ChangeRules,
        ReinstateMember,
        RemoveMember,
        ReplaceMeter,
        RotateKey,
        SuspendMember,
    )

    if getattr(args, "rules_command", None) == "set":
        fields: dict[str, Any] = {
            "feed_in_tariff": args.feed_in_tariff,
            "retail_price": args.retail_price,
            "grid_fee": args.grid_fee,
            "local_fee": args.local_fee,
            "mechanism": args.mechanism,
            "k": args.k,
            "time_of_use": None
            if args.time_of_use is None
            else parse_time_of_use(args.time_of_use),
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        if not fields:
            raise CliError("rules set: name at least one rule to change")
        return ChangeRules, fields
    action = args.member_command
    fields = {"household": args.did}
    if action == "add":
        fields.update(meter_serial=args.meter_serial, role=args.role)
        if args.max_power_w is not None:
            fields["max_power_w"] = args.max_power_w
        return AddMember, fields
    if action == "set-role":
        return ChangeRole, {**fields, "role": args.role}
    if action == "rotate-key":
        return RotateKey, {**fields, "new_household": args.new_did}
    if action == "replace-meter":
        fields.update(
            meter_serial=args.meter_serial,
            old_import_wh=args.old_import_wh,
            old_export_wh=args.old_export_wh,
            new_import_wh=args.new_import_wh,
            new_export_wh=args.new_export_wh,
        )
        if args.max_power_w is not None:
            fields["max_power_w"] = args.max_power_w
        return ReplaceMeter, fields
    simple = {"remove": RemoveMember, "suspend": SuspendMember, "reinstate": ReinstateMember}
    return simple[action], fields


def _signers(args: argparse.Namespace) -> tuple[Any, Any]:
    """The operator's signer and, for ``rotate-key --old-key``, the old key's."""
    from node.setup.keyfile import KeyFileError, load_key_file

    try:
        operator = load_key_file(args.operator_key).signer
        old_key = getattr(args, "old_key", None)
        old = None if old_key is None else load_key_file(old_key).signer
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    if old is not None and old.did != args.did:
        raise CliError(f"--old-key {args.old_key} is {old.did}, not the household {args.did}")
    return operator, old


def submit(args: argparse.Namespace) -> tuple[int, Any]:
    """Sign the command's record and post it; a nonce taken meanwhile (``replayed_nonce``) is
    replaced by a fresh one and the record signed again (the refused one changed nothing)."""
    from pydantic import ValidationError

    from market.models import encode_command, first_error

    if not 0 <= args.wait <= 120:
        raise CliError("--wait must be in 0..120 seconds")
    cls, fields = _record_fields(args)
    operator, old = _signers(args)
    for attempt in range(_NONCE_RETRIES):
        info = _get(args.node, "/governance")
        if operator.did != info["operator"]:
            raise CliError(
                f"--operator-key is {operator.did}, but the grid operator is {info['operator']}"
            )
        nonce = args.nonce if args.nonce is not None else info["nonce"]
        if nonce is None:
            raise CliError(
                "the node has no free operator nonce now (too many governance "
                "records at once): try again in a few slots",
                EXIT_REFUSED,
            )
        from_slot = args.from_slot
        if from_slot is None:
            from_slot = info["open_slot"] + FROM_SLOT_MARGIN
        try:
            record = cls(
                grid=info["grid"], nonce=nonce, operator=operator.did, from_slot=from_slot, **fields
            ).signed_by(operator)
        except ValidationError as exc:
            raise CliError(f"invalid {cls.KIND}: {first_error(exc)}") from None
        if old is not None:
            record = record.countersigned_by(old)
        status, doc = request(
            args.node,
            "POST",
            f"/governance?wait={args.wait}",
            encode_command(record),
            timeout=args.wait + 15,
        )
        retry = status == 409 and doc.get("reason") == "replayed_nonce" and args.nonce is None
        if not retry or attempt == _NONCE_RETRIES - 1:
            return status, doc
    raise AssertionError("unreachable")  # pragma: no cover


def describe(doc: dict[str, Any]) -> str:
    """One line of what a committed record changed."""
    who = f" of {doc['household']}" if "household" in doc else ""
    new = f" -> {doc['new_household']}" if "new_household" in doc else ""
    index = doc.get("applied_index")
    where = f" (log index {index})" if index is not None else ""
    withdrawn = doc.get("withdrawn_orders")
    orders = f"; {withdrawn} resting orders withdrawn" if withdrawn else ""
    return f"{doc.get('type')}{who}{new} in force from slot {doc.get('from_slot')}{where}{orders}"


def _report(status: int, doc: Any, as_json: bool) -> int:
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    if status == 200:
        if not as_json:
            print(f"committed: {describe(doc)}")
        return 0
    if status == 202:
        if not as_json:
            print(
                f"submitted, not yet committed: {describe(doc)} (nonce {doc.get('nonce')}; "
                "repeat with --nonce to wait again, or check `microgrid member list`)"
            )
        return EXIT_PENDING
    reason = doc.get("reason", f"http_{status}") if isinstance(doc, dict) else f"http_{status}"
    detail = doc.get("detail") or doc.get("error", "") if isinstance(doc, dict) else str(doc)
    if not as_json:
        print(f"refused ({reason}): {detail}", file=sys.stderr)
    return EXIT_REFUSED if status in (403, 409) else EXIT_USAGE


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(fn(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status


def cmd_member_change(args: argparse.Namespace) -> int:
    """``member add|remove|suspend|reinstate|set-role|rotate-key|replace-meter``."""
    return _run(lambda a: _report(*submit(a), a.json), args)


def cmd_rules_set(args: argparse.Namespace) -> int:
    """``rules set``: a ChangeRules record from ``--from-slot``."""
    return _run(lambda a: _report(*submit(a), a.json), args)


def members_table(doc: dict[str, Any]) -> list[str]:
    """``GET /members`` as text lines: DID, role, meter, status, since slot, then what is
    scheduled."""
    rows = [("DID", "ROLE", "METER", "STATUS", "SINCE")]
    for m in doc["members"]:
        rows.append((m["did"], m["role"], m["meter_serial"], m["status"], str(m["since_slot"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for m in doc["members"]:
        for t in m.get("scheduled", ()):
            lines.append(
                f"  scheduled: {m['did']} from slot {t['from_slot']}: {t['status']}, "
                f"{t['role']}, meter {t['meter_serial']}"
            )
    lines.append(f"(standing in slot {doc['slot']}, the open slot)")
    return lines


def cmd_member_list(args: argparse.Namespace) -> int:
    """``member list``: every household a node knows of."""

    def run(a: argparse.Namespace) -> int:
        doc = _get(a.node, "/members")
        if a.json:
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            print("\n".join(members_table(doc)))
        return 0

    return _run(run, args)


def _rules_line(rules: dict[str, Any]) -> str:
    line = (
        f"feed-in {rules['feed_in_tariff']}, retail {rules['retail_price']}, "
        f"{rules['mechanism']} k={rules['k']}"
    )
    if rules.get("grid_fee") or rules.get("local_fee"):
        line += (
            f", grid fee {rules.get('grid_fee', 0)}/kWh imported, "
            f"{rules.get('local_fee', 0)}/kWh bought locally"
        )
    tou = rules.get("time_of_use")
    if tou:
        periods = ", ".join(f"{s // 60:02d}:{s % 60:02d}={f}/{r}" for s, f, r in tou)
        line += f", time of use {periods}"
    return line


def cmd_rules_show(args: argparse.Namespace) -> int:
    """``rules show``: the rules in force in the open slot and every change."""

    def run(a: argparse.Namespace) -> int:
        doc = _get(a.node, "/rules")
        if a.json:
            print(json.dumps(doc, indent=2, sort_keys=True))
            return 0
        band = doc["band"]
        print(
            f"in force in slot {doc['slot']}: {_rules_line(doc['rules'])} "
            f"(band {band['feed_in_tariff']}..{band['retail_price']})"
        )
        print("history:")
        for entry in doc["history"]:
            print(f"  from slot {entry['from_slot']}: {_rules_line(entry['rules'])}")
        return 0

    return _run(run, args)

"""``bucketmesh audit duplicates FILE...``: requests charged more than once.

Reads audit trails (JSON lines as ``telemetry/audit.py`` writes them; ``-`` is
stdin, ``.gz`` files are read compressed) and groups the *charges* — ``consume``
events with ``allowed: true`` and ``tokens`` > 0 — by ``Idempotency-Key``, or by
request id for a charge without one. A group of two or more charges is a request charged
more than once: a retry that was not deduplicated, or a client reusing an id.
Where the articles troubleshoot token drift by "looking for duplicate 'consume'
events in the audit log", this is that look.

A line that is not a JSON object is counted and named (file:line), never fatal.

Exit status: 0 no duplicate charge, 1 duplicates found, 2 a usage error or a
file that cannot be read.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TextIO

from bucketmesh.telemetry.audit import CONSUME
from bucketmesh.telemetry.log import logger

log = logger("audit")


@dataclass
class Charge:
    source: str  # file:line
    time: str
    region: str
    rule: str
    key: str
    tokens: int


@dataclass
class Duplicates:
    events: int = 0
    charges: int = 0
    malformed: list[str] = field(default_factory=list)
    #: (field, value) → the charges carrying it, for values charged more than once
    groups: dict[tuple[str, str], list[Charge]] = field(default_factory=dict)

    @property
    def extra_tokens(self) -> int:
        """Tokens charged beyond the first charge of each duplicated request."""
        return sum(sum(c.tokens for c in charges[1:]) for charges in self.groups.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "charges": self.charges,
            "duplicated_requests": len(self.groups),
            "extra_tokens": self.extra_tokens,
            "malformed_lines": self.malformed,
            "duplicates": [
                {
                    "by": by,
                    "value": value,
                    "charges": [c.__dict__ for c in charges],
                }
                for (by, value), charges in sorted(self.groups.items())
            ],
        }


class UnreadableTrail(Exception):
    """A file of the trail that cannot be read at all; the message names it."""


def _lines(path: str) -> Iterator[str | None]:
    """The file's lines as text; None for a line that is not UTF-8 (a malformed line,
    never fatal)."""
    stream: IO[bytes] | gzip.GzipFile
    if path == "-":
        stream = sys.stdin.buffer
    elif path.endswith(".gz"):
        stream = gzip.open(path, "rb")  # noqa: SIM115
    else:
        stream = open(path, "rb")  # noqa: SIM115
    with contextlib.nullcontext(stream) if path == "-" else stream:
        for raw in stream:
            try:
                yield raw.decode()
            except UnicodeDecodeError:
                yield None


def find_duplicates(paths: Iterable[str]) -> Duplicates:
    """Raises UnreadableTrail naming a file that cannot be read (missing, not gzip,
    cut short)."""
    found = Duplicates()
    seen: dict[tuple[str, str], list[Charge]] = {}
    for path in paths:
        try:
            _scan(path, found, seen)
        except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise UnreadableTrail(f"{path}: {reason}") from None
    found.groups = {ident: charges for ident, charges in seen.items() if len(charges) > 1}
    return found


def _scan(path: str, found: Duplicates, seen: dict[tuple[str, str], list[Charge]]) -> None:
    for number, line in enumerate(_lines(path), 1):
        if line is not None and not line.strip():
            continue
        try:
            event = json.loads(line) if line is not None else None
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            found.malformed.append(f"{path}:{number}")
            continue
        found.events += 1
        if event.get("event") != CONSUME or event.get("allowed") is not True:
            continue
        tokens = event.get("tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            continue
        found.charges += 1
        charge = Charge(
            f"{path}:{number}",
            str(event.get("time", "")),
            str(event.get("region", "")),
            str(event.get("rule", "")),
            str(event.get("key", "")),
            tokens,
        )
        # one identity per charge (the Idempotency-Key, else the request id), so a
        # request is counted once however many ids it carries
        for by in ("idempotency_key", "request_id"):
            value = event.get(by)
            if isinstance(value, str) and value:
                seen.setdefault((by, value), []).append(charge)
                break


def render_table(found: Duplicates, out: TextIO) -> None:
    out.write(
        f"{found.events} events, {found.charges} charges, "
        f"{len(found.groups)} requests charged more than once "
        f"({found.extra_tokens} tokens too many)\n"
    )
    for (by, value), charges in sorted(found.groups.items()):
        out.write(f"\n{by} {value!r}: charged {len(charges)} times\n")
        for c in charges:
            out.write(f"  {c.time}  {c.region}  {c.rule}  {c.key}  {c.tokens}  ({c.source})\n")
    if found.malformed:
        shown = ", ".join(found.malformed[:10])
        more = f" and {len(found.malformed) - 10} more" if len(found.malformed) > 10 else ""
        out.write(f"\n{len(found.malformed)} lines are not JSON objects: {shown}{more}\n")


def cmd_duplicates(args: argparse.Namespace) -> int:
    try:
        found = find_duplicates(args.files)
    except UnreadableTrail as error:
        log.error("audit duplicates: error: %s", error)
        return 2
    if args.format == "json":
        sys.stdout.write(json.dumps(found.to_json(), indent=2, ensure_ascii=False) + "\n")
    else:
        render_table(found, sys.stdout)
    return 1 if found.groups else 0


def add_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="read audit trails")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    p = audit_sub.add_parser(
        "duplicates",
        help="requests charged more than once (same Idempotency-Key or request id)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="audit files (- for stdin, .gz ok)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_duplicates, usage_error=p.error)

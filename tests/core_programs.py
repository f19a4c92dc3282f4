"""Programs of core operations, run the same way on the compiled and the pure core.

``run(program)`` plays a program (a list of plain tuples, msgpack-able) on two
``Limiter`` replicas and returns everything observable as bytes: each operation's
decision(s) or error, and at the end each replica's full state, dirty set and
journal. tests/test_compiled_core.py runs it in-process (the compiled build) and
in a worker process started with ``BUCKETMESH_PURE=1`` (``python core_programs.py``:
length-prefixed programs on stdin, length-prefixed results on stdout), and
compares the bytes (dict keys sorted, floats as IEEE doubles).
"""

from __future__ import annotations

import struct
import sys
from types import SimpleNamespace
from typing import Any

import msgspec

from bucketmesh.core.bucket import NS_PER_S
from bucketmesh.core.decisions import Ask
from bucketmesh.core.limiter import Limiter, LimiterError, batch_asks, tally
from bucketmesh.core.rules import Rule

START = 1_000 * NS_PER_S + 7
RULES = [
    Rule.create("s-{{ .Request.Header.X }}", 5, 2.0, name="s"),
    Rule.create("l-{{ .Request.Header.X }}", 3, 1.0, name="l", mode="local"),
    Rule.create("t-{{ .Request.Header.X }}", 6, 3.0, name="t", mode="strict"),
    Rule.create("h-{{ .Request.Header.X }}", 10**10, 10**5, name="h", ttl=2),
]
KEYS = ["s-a", "s-b", "l-a", "t-a", "h-a", "s-c"]
# dict keys sorted: sets of replica ids iterate in per-process hash order, so a dict
# built from one may list the same entries in another order in the other process
_encoder = msgspec.msgpack.Encoder(order="sorted")


def _answer(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except (LimiterError, ValueError) as error:
        return ["error", type(error).__name__, getattr(error, "index", None), str(error)]


def run(program: list[Any]) -> bytes:
    replicas = [
        Limiter(RULES, replica_id="r/a/1", regions=2, clock=lambda: 0),
        Limiter(RULES, replica_id="r/b/1", regions=2, clock=lambda: 0),
    ]
    replicas[1].enable_journal()
    now = START
    out: list[Any] = []
    for op, who, dt, arg in program:
        now += dt
        limiter = replicas[who]
        if op == "acquire":
            key, tokens, rule = arg
            out.append(_answer(limiter.acquire, key, tokens, rule=rule, now=now))
        elif op == "many":
            asks, atomic = arg
            batch = [Ask(*one) for one in asks]
            # the route's helpers: asks from decoded items, and the metrics' tally
            items = [SimpleNamespace(key=k, tokens=t, rule=r) for k, t, r in asks]
            out.append(batch_asks(items, {rule.name for rule in RULES}))
            decided = _answer(limiter.acquire_many, batch, atomic=atomic, now=now)
            out.append(decided)
            if isinstance(decided, list) and decided and not isinstance(decided[0], str):
                out.append(tally(decided, 0.4))
        elif op == "columns":
            # a batch decided as columns (Limiter.acquire_columns), or None and then
            # the general path, as the batch route does
            items = [SimpleNamespace(key=k, tokens=t, rule=r) for k, t, r in arg]
            columns = limiter.acquire_columns(items, now)
            if columns is None:
                out.append(None)
                out.append(_answer(limiter.acquire_many, [Ask(*one) for one in arg], now=now))
            else:
                out.append(columns.decisions())
                out.append(columns.tally(0.4))
        elif op == "sync":
            deltas = limiter.collect_deltas()
            out.append(replicas[1 - who].merge(deltas, now=now))
        elif op == "full":
            out.append(replicas[1 - who].merge(limiter.full_state(), now=now))
        elif op == "expire":
            out.append(limiter.expire(now))
        elif op == "configure":
            name, capacity, rate = arg
            out.append(
                _answer(limiter.configure, name, capacity=capacity, refill_rate=rate, now=now)
            )
        elif op == "journal":
            group = limiter.collect_journal()
            # the deltas in key order (the journal is a set: per-process hash order)
            out.append(None if group is None else sorted(group.deltas, key=lambda d: d.key))
    for limiter in replicas:
        rid = limiter.replica_id
        out.append(
            [
                {
                    key: bucket.full_state(key, rid)
                    for key, bucket in sorted(limiter.buckets.items())
                },
                sorted(limiter.dirty),
                sorted(limiter.journal.keys) if limiter.journal is not None else None,
                [(key, limiter.inspect(key, now=now).level(now)) for key in KEYS],
            ]
        )
    return _encoder.encode(out)


def serve() -> None:
    """The worker: programs in, results out, until stdin closes."""
    from bucketmesh import _native

    read, write = sys.stdin.buffer.read, sys.stdout.buffer.write
    write(b"pure\n" if not _native.compiled() else b"compiled\n")
    sys.stdout.flush()
    decode = msgspec.msgpack.Decoder().decode
    while True:
        head = read(4)
        if len(head) < 4:
            return
        (size,) = struct.unpack("<I", head)
        result = run(decode(read(size)))
        write(struct.pack("<I", len(result)) + result)
        sys.stdout.flush()


if __name__ == "__main__":
    serve()

"""The batch fast paths decide and answer bit for bit as the general paths do.

``Limiter.acquire_many`` answers a batch whose asks all name live buckets in one
pass (``_acquire_live``): each bucket's acquire in order (a run of one ask
repeated in one ``Bucket.acquire_run``), the dirty set and the journal updated
once per granted key. The general path (every ask validated,
then ``Limiter.acquire`` one at a time) is the reference: over random programs
of batches (hot keys repeated, new keys, peeks, tokens above the capacity, rules
named or not, shared / local / strict buckets, a peer's deltas merged in between,
time moving or not), both limiters give the same decisions, raise the same
errors at the same index, and end with the same buckets, dirty set and journal.

``POST /v1/rate/batch`` encodes its results in one call and splices the region
in after every object; the bytes must be those of encoding each decision and
splicing one at a time, whatever the keys and rule names hold (quotes, braces,
the very text the splice looks for).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bucket_laws import KEY, grow, ops

from bucketmesh import _native
from bucketmesh.api.routes import RatingApp
from bucketmesh.core.bucket import NS_PER_S, Decision
from bucketmesh.core.decisions import Ask
from bucketmesh.core.limiter import DecisionColumns, Limiter, LimiterError, tally
from bucketmesh.core.rules import Rule
from bucketmesh.http.errors import ApiError
from bucketmesh.http.server import Request, Response
from bucketmesh.http.wire import RateRequest
from bucketmesh.storage.memory import MemoryStore

START = 1_000 * NS_PER_S + 7
RULES = [
    Rule.create("s-{{ .Request.Header.X }}", 5, 2.0, name="s"),
    Rule.create("l-{{ .Request.Header.X }}", 3, 1.0, name="l", mode="local"),
    Rule.create("t-{{ .Request.Header.X }}", 6, 3.0, name="t", mode="strict"),
]
KEYS = ["s-a", "s-b", "l-a", "t-a", "s-c"]

ask = st.builds(
    Ask,
    st.sampled_from(KEYS),
    st.integers(min_value=0, max_value=3) | st.integers(min_value=-1, max_value=7),
    st.sampled_from([None] * 8 + ["s", "l", "t", "nope"]),
)
# runs of one ask repeated (a hot key: Bucket.acquire_run) among single asks
asks = st.lists(
    st.tuples(ask, st.integers(min_value=1, max_value=4) | st.integers(min_value=5, max_value=40)),
    max_size=8,
).map(lambda runs: [one for one, times in runs for _ in range(times)])
steps = st.lists(
    st.tuples(
        st.sampled_from(["batch", "batch", "batch", "peer"]),
        st.integers(min_value=0, max_value=2 * NS_PER_S),
        asks,
    ),
    max_size=12,
)


def state(limiter: Limiter) -> Any:
    rid = limiter.replica_id
    return (
        {key: bucket.full_state(key, rid) for key, bucket in limiter.buckets.items()},
        set(limiter.dirty),
        set(limiter.journal.keys) if limiter.journal is not None else None,
    )


def outcome(limiter: Limiter, batch: list[Ask], now: int) -> Any:
    try:
        return limiter.acquire_many(batch, now=now)
    except LimiterError as error:
        return (type(error), error.index, str(error))


@pytest.mark.skipif(
    _native.compiled(),
    reason="patches a method of the compiled Limiter: runs on the pure core (BUCKETMESH_PURE=1)",
)
@settings(max_examples=300, deadline=None)
@given(steps, st.booleans(), st.booleans())
def test_the_one_pass_batch_decides_as_the_general_path(
    program: list[tuple[str, int, list[Ask]]], journal: bool, warm: bool
) -> None:
    fast = Limiter(RULES, replica_id="r1", regions=2)
    general = Limiter(RULES, replica_id="r1", regions=2)
    general._acquire_live = lambda asks, now: None  # type: ignore[method-assign]
    peer = Limiter(RULES, replica_id="r2", regions=2)
    if journal:
        fast.enable_journal()
        general.enable_journal()
    now = START
    if warm:  # every key live from the start: most batches take the one pass
        for key in KEYS:
            fast.acquire(key, 1, now=now)
            general.acquire(key, 1, now=now)
    for kind, step, batch in program:
        now += step
        if kind == "peer":
            for key, tokens, _ in batch:
                if key.startswith("s-") and tokens > 0:
                    peer.acquire(key, min(tokens, 5), now=now)
            sent = peer.collect_deltas()
            fast.merge(sent, now=now)
            general.merge(sent, now=now)
            continue
        assert outcome(fast, batch, now) == outcome(general, batch, now)
        assert state(fast) == state(general)


def spliced_one_at_a_time(app: RatingApp, decisions: list[Decision]) -> bytes:
    """The batch body as it was built before the single encode."""
    encode = app.encoder.encode
    suffix = app.renderer.region_suffix
    results = [encode(decision)[:-1] + suffix for decision in decisions]
    allowed = sum(decision.allowed for decision in decisions)
    return b'{"results":[%s],"allowed":%d,"denied":%d}' % (
        b",".join(results),
        allowed,
        len(results) - allowed,
    )


awkward = st.text(alphabet=st.sampled_from('a"},{\\:allowedtrue\u2011 '), max_size=20) | st.just(
    '"},{"allowed":true,'
)
decisions = st.lists(
    st.builds(
        Decision,
        st.booleans(),
        awkward,
        st.integers(min_value=0, max_value=10**12),
        st.integers(min_value=0, max_value=10**12),
        st.floats(min_value=0, max_value=1e9),
        st.floats(min_value=0, max_value=1e6),
        st.floats(min_value=0, max_value=1e6),
        st.sampled_from(["shared", "local", "strict"]),
        awkward,
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(decisions, st.sampled_from(["eu", 'r"},{"allowed":true,', "\u00e9"]))
def test_the_single_encode_gives_the_bytes_of_one_encode_per_decision(
    batch: list[Decision], region: str
) -> None:
    app = RatingApp(MemoryStore(Limiter(RULES, replica_id="r1")), region=region, node="n")
    response = app._batch_response(batch)
    assert response.body == spliced_one_at_a_time(app, batch)
    body = msgspec.json.decode(response.body)
    assert [result["region"] for result in body["results"]] == [region] * len(batch)
    counted = app.metrics.decisions
    for rule in {decision.rule for decision in batch}:
        for allowed in (True, False):
            expected = sum(1 for d in batch if d.rule == rule and d.allowed == allowed)
            label = (rule, "allowed" if allowed else "denied")
            assert counted.get(label, 0) == expected


@settings(max_examples=500, deadline=None)
@given(
    ops,
    st.integers(min_value=0, max_value=2),
    st.integers(min_value=0, max_value=5),
    st.integers(min_value=1, max_value=12),
    st.integers(min_value=0, max_value=3 * NS_PER_S),
)
def test_a_run_decides_as_one_acquire_after_another(
    program: list[tuple[str, int, int, int]], replica: int, tokens: int, count: int, step: int
) -> None:
    """``Bucket.acquire_run`` against ``acquire`` in a loop, on buckets three replicas
    built by granting, reconfiguring, merging and re-creating (test_bucket_laws)."""
    runs, loops = grow(program), grow(program)
    now = runs.now + step
    bucket, twin = runs.buckets[replica], loops.buckets[replica]
    tokens = min(tokens, bucket.config.capacity)
    assert bucket.acquire_run(KEY, tokens, count, now) == [
        twin.acquire(KEY, tokens, now) for _ in range(count)
    ]
    assert runs.state(replica) == loops.state(replica)
    assert (bucket.g, bucket.unc, bucket.total, bucket.mine) == (
        twin.g,
        twin.unc,
        twin.total,
        twin.mine,
    )


class Tagged(Decision, frozen=True):
    """A decision whose JSON does not end with the rule (a layout the splice must notice)."""

    tag: int = 7


@settings(max_examples=100, deadline=None)
@given(decisions)
def test_a_layout_the_splice_does_not_know_is_encoded_one_object_at_a_time(
    batch: list[Decision],
) -> None:
    app = RatingApp(MemoryStore(Limiter(RULES, replica_id="r1")), region="eu", node="n")
    tagged = [Tagged(*msgspec.structs.astuple(decision)) for decision in batch]
    assert app._batch_response(tagged).body == spliced_one_at_a_time(app, tagged)


# -- the columnar batch (Limiter.acquire_columns, RatingApp._columns_response) --------


def items_of(batch: list[Ask]) -> list[Any]:
    """The asks as the route hands them over: decoded request items."""
    return [RateRequest(key=key, rule=rule, tokens=tokens) for key, tokens, rule in batch]


@settings(max_examples=300, deadline=None)
@given(steps, st.booleans(), st.booleans())
def test_the_columns_decide_as_one_acquire_after_another(
    program: list[tuple[str, int, list[Ask]]], journal: bool, warm: bool
) -> None:
    """A batch decided as columns gives, row for row, the decisions of N single
    acquires in order, and leaves the same buckets, dirty set and journal (Σ used
    included); when it declines (None) nothing has changed, and ``acquire_many`` of
    the same batch decides as it always did."""
    columnar = Limiter(RULES, replica_id="r1", regions=2)
    single = Limiter(RULES, replica_id="r1", regions=2)
    peer = Limiter(RULES, replica_id="r2", regions=2)
    if journal:
        columnar.enable_journal()
        single.enable_journal()
    now = START
    if warm:
        for key in KEYS:
            columnar.acquire(key, 1, now=now)
            single.acquire(key, 1, now=now)
    for kind, step, batch in program:
        now += step
        if kind == "peer":
            for key, tokens, _ in batch:
                if key.startswith("s-") and tokens > 0:
                    peer.acquire(key, min(tokens, 5), now=now)
            sent = peer.collect_deltas()
            columnar.merge(sent, now=now)
            single.merge(sent, now=now)
            continue
        before = state(columnar)
        columns = columnar.acquire_columns(items_of(batch), now)
        if columns is None:
            assert state(columnar) == before
            assert outcome(columnar, batch, now) == outcome(single, batch, now)
        else:
            expected = [
                single.acquire(key, tokens, rule=rule, now=now) for key, tokens, rule in batch
            ]
            assert columns.decisions() == expected
            assert len(columns) == len(batch)
            assert columns.tally(0.4) == tally(expected, 0.4)
        assert state(columnar) == state(single)


def columns_of(decisions: list[Decision]) -> DecisionColumns:
    columns = DecisionColumns()
    for decision in decisions:
        columns.allowed.append(decision.allowed)
        columns.keys.append(decision.key)
        columns.remaining.append(decision.tokens_remaining)
        columns.capacity.append(decision.capacity)
        columns.refill_rate.append(decision.refill_rate)
        columns.retry_after.append(decision.retry_after)
        columns.reset_after.append(decision.reset_after)
        columns.mode.append(decision.mode)
        columns.rule.append(decision.rule)
    return columns


@settings(max_examples=300, deadline=None)
@given(
    decisions | decisions.map(lambda batch: batch[:1] * 7 + batch),
    st.sampled_from(["eu", 'r"},{"allowed":true,', "\u00e9"]),
)
def test_the_columns_render_the_bytes_of_the_decisions(batch: list[Decision], region: str) -> None:
    """``_columns_response`` gives the body and the metrics ``_batch_response`` gives
    for the same decisions, whatever the keys, rules and modes hold."""
    by_columns = RatingApp(MemoryStore(Limiter(RULES, replica_id="r1")), region=region, node="n")
    by_decisions = RatingApp(MemoryStore(Limiter(RULES, replica_id="r1")), region=region, node="n")
    columns = columns_of(batch)
    assert columns.decisions() == batch
    body = by_columns._columns_response(columns).body
    assert (
        body == by_decisions._batch_response(batch).body == spliced_one_at_a_time(by_columns, batch)
    )
    assert by_columns.metrics.decisions == by_decisions.metrics.decisions
    assert by_columns.metrics.near_limit == by_decisions.metrics.near_limit


ROUTE_RULES = [*RULES, Rule.create("w-{{ .Request.Header.X }}", 4, 1.0, name="w", shadow=True)]
ROUTE_KEYS = [*KEYS, "w-a", 'x"},{"allowed":true,']


def batch_request(batch: list[Ask], atomic: bool) -> Request:
    body = msgspec.json.encode(
        {
            "requests": [
                {"key": key, "tokens": tokens, "rule": rule} for key, tokens, rule in batch
            ],
            "atomic": atomic,
        }
    )
    return Request(
        "POST", "/v1/rate/batch", {}, {"content-type": "application/json"}, body, "127.0.0.1", "1.1"
    )


def answer_of(app: RatingApp, request: Request) -> Any:
    try:
        response = app.rate_batch(request)
    except ApiError as error:
        return (error.status, error.field, str(error))
    assert isinstance(response, Response)
    return (response.status, response.body, response.headers)


route_ask = st.builds(
    Ask,
    st.sampled_from(ROUTE_KEYS),
    st.integers(min_value=0, max_value=3) | st.integers(min_value=-1, max_value=7),
    st.sampled_from([None] * 8 + ["s", "l", "t", "w", "nope"]),
)
route_batches = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2 * NS_PER_S),
        st.lists(st.tuples(route_ask, st.integers(1, 4) | st.integers(5, 40)), max_size=6).map(
            lambda runs: [one for one, times in runs for _ in range(times)]
        ),
        st.booleans(),
    ),
    max_size=10,
)


@settings(max_examples=200, deadline=None)
@given(route_batches)
def test_the_batch_route_answers_as_before_the_columns(
    program: list[tuple[int, list[Ask], bool]],
) -> None:
    """``POST /v1/rate/batch`` through the columns answers with today's bytes, status,
    headers and problem+json (shadow rules, refusals, bad items, atomic batches
    included) and counts the same metrics as the route without them."""
    clock = [START]
    apps = []
    for columnar in (True, False):
        limiter = Limiter(
            [*ROUTE_RULES, Rule.create("x{{ .Request.Header.X }}", 9, 5.0, name="x")],
            replica_id="r1",
            clock=lambda: clock[0],
        )
        store = MemoryStore(limiter)
        if not columnar:
            store.acquire_columns = lambda items: None  # type: ignore[method-assign]
        apps.append((RatingApp(store, region="eu", node="n"), limiter))
    for step, batch, atomic in program:
        clock[0] += step
        request = batch_request(batch, atomic)
        (fast, fast_limiter), (general, general_limiter) = apps
        assert answer_of(fast, request) == answer_of(general, request)
        assert state(fast_limiter) == state(general_limiter)
        assert fast.metrics.decisions == general.metrics.decisions
        assert fast.metrics.near_limit == general.metrics.near_limit
        assert fast.metrics.shadow_refused == general.metrics.shadow_refused

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
from bucketmesh.core.limiter import Limiter, LimiterError
from bucketmesh.core.rules import Rule
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

"""The sync protocol without sockets: sealing, verification, replay, digests."""

from __future__ import annotations

import msgspec
import pytest

from bucketmesh.core.bucket import NS_PER_S, BucketConfig, BucketDelta
from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.replication import protocol as sync

NOW = 1_700_000_000 * NS_PER_S
SECRET = "correct horse battery staple"
CLUSTER = "global-rate-limit-cluster"
CONFIG = BucketConfig(100, NS_PER_S, 3600 * NS_PER_S, "shared", (0, "rule:r:abc"))


def nonce(n: int) -> bytes:
    return n.to_bytes(sync.NONCE_BYTES, "big")


def delta(
    key: str = "k", used: dict[str, int] | None = None, base: int = NOW - 100 * NS_PER_S
) -> BucketDelta:
    """A bucket that has been at rest (full) for about 100 s by default."""
    return BucketDelta(key, 0, CONFIG, CONFIG.version, base, used or {"a/n/1": 3}, "r")


def push_body(*deltas: BucketDelta) -> bytes:
    return sync.encode(sync.DeltaPush(NOW, False, DeltaBatch("a/n/1", list(deltas))))


def sealed(
    auth: sync.SyncAuth,
    body: bytes,
    *,
    n: int = 1,
    now: int = NOW,
    kind: str = "deltas",
    reply_to: bytes = b"",
) -> bytes:
    return auth.seal(
        kind, body, sender="a/n/1", region="a", now_ns=now, nonce=nonce(n), reply_to=reply_to
    )


def rejection(call: object) -> sync.Rejected:
    with pytest.raises(sync.Rejected) as caught:
        call()  # type: ignore[operator]
    return caught.value


# -- sealing and opening --------------------------------------------------------


def test_a_sealed_message_opens_with_every_field_intact() -> None:
    auth = sync.SyncAuth(CLUSTER, SECRET)
    body = push_body(delta())
    env = auth.open(sealed(auth, body), kinds=("deltas",), now_ns=NOW + NS_PER_S)
    assert (env.cluster_id, env.kind, env.sender, env.region) == (CLUSTER, "deltas", "a/n/1", "a")
    assert env.sent_ns == NOW and env.nonce == nonce(1) and env.body == body
    assert len(env.mac) == 32
    payload = sync.decode_body(env)
    assert isinstance(payload, sync.DeltaPush)
    assert payload.batch.deltas == [delta()]


def test_a_different_secret_is_a_bad_signature() -> None:
    forged = sealed(sync.SyncAuth(CLUSTER, "guessed secret"), push_body(delta()))
    error = rejection(
        lambda: sync.SyncAuth(CLUSTER, SECRET).open(forged, kinds=("deltas",), now_ns=NOW)
    )
    assert (error.reason, error.status) == ("bad_signature", 401)


@pytest.mark.parametrize("field", ["kind", "sender", "region", "sent_ns", "nonce", "body"])
def test_changing_any_signed_field_breaks_the_signature(field: str) -> None:
    auth = sync.SyncAuth(CLUSTER, SECRET)
    env = msgspec.msgpack.decode(sealed(auth, push_body(delta())), type=sync.Envelope)
    changed = {
        "kind": "pull",
        "sender": "b/n/1",
        "region": "b",
        "sent_ns": NOW + 1,
        "nonce": nonce(2),
        "body": push_body(delta(used={"a/n/1": 99})),
    }
    tampered = msgspec.msgpack.encode(msgspec.structs.replace(env, **{field: changed[field]}))
    error = rejection(lambda: auth.open(tampered, kinds=("deltas", "pull"), now_ns=NOW))
    assert (error.reason, error.status) == ("bad_signature", 401)


def test_an_unsigned_message_is_refused_when_the_mesh_has_a_secret() -> None:
    unsigned = sealed(sync.SyncAuth(CLUSTER, None), push_body(delta()))
    error = rejection(
        lambda: sync.SyncAuth(CLUSTER, SECRET).open(unsigned, kinds=("deltas",), now_ns=NOW)
    )
    assert (error.reason, error.status) == ("unsigned", 401)


def test_insecure_mode_accepts_unsigned_messages_but_still_checks_the_cluster() -> None:
    insecure = sync.SyncAuth(CLUSTER, None)
    assert insecure.insecure
    env = insecure.open(sealed(insecure, push_body()), kinds=("deltas",), now_ns=NOW)
    assert env.mac == b""
    other = sealed(sync.SyncAuth("other", None), push_body())
    assert rejection(lambda: insecure.open(other, kinds=("deltas",), now_ns=NOW)).status == 403


def test_a_wrong_cluster_is_forbidden_even_with_the_right_secret() -> None:
    other = sealed(sync.SyncAuth("another-cluster", SECRET), push_body(delta()))
    error = rejection(
        lambda: sync.SyncAuth(CLUSTER, SECRET).open(other, kinds=("deltas",), now_ns=NOW)
    )
    assert (error.reason, error.status) == ("wrong_cluster", 403)


@pytest.mark.parametrize("offset_s", [-31, 31, -3600])
def test_a_message_outside_the_window_is_stale(offset_s: int) -> None:
    auth = sync.SyncAuth(CLUSTER, SECRET)
    message = sealed(auth, push_body(), now=NOW + offset_s * NS_PER_S)
    error = rejection(lambda: auth.open(message, kinds=("deltas",), now_ns=NOW))
    assert (error.reason, error.status) == ("stale", 401)


def test_a_message_inside_the_window_is_fresh() -> None:
    """Sealed up to 30 s either side of the receiver's clock, edges included: opened
    whole, and its nonce remembered for the replay check."""
    auth = sync.SyncAuth(CLUSTER, SECRET)
    guard = sync.ReplayGuard()
    body = push_body(delta())
    offsets = (-30, -29, 0, 29, 30)
    for n, offset_s in enumerate(offsets, start=1):
        sent = NOW + offset_s * NS_PER_S
        message = sealed(auth, body, n=n, now=sent)
        env = auth.open(message, kinds=("deltas",), now_ns=NOW, replay=guard)
        assert (env.kind, env.sender, env.region) == ("deltas", "a/n/1", "a")
        assert (env.sent_ns, env.nonce, env.body) == (sent, nonce(n), body)
        payload = sync.decode_body(env)
        assert isinstance(payload, sync.DeltaPush) and payload.batch.deltas == [delta()]
    assert len(guard) == len(offsets)


def test_a_replayed_message_is_refused_and_a_new_nonce_is_not() -> None:
    auth = sync.SyncAuth(CLUSTER, SECRET)
    guard = sync.ReplayGuard()
    message = sealed(auth, push_body(delta()))
    auth.open(message, kinds=("deltas",), now_ns=NOW, replay=guard)
    error = rejection(
        lambda: auth.open(message, kinds=("deltas",), now_ns=NOW + NS_PER_S, replay=guard)
    )
    assert (error.reason, error.status) == ("replay", 401)
    fresh = sealed(auth, push_body(delta()), n=2)
    assert auth.open(fresh, kinds=("deltas",), now_ns=NOW, replay=guard).nonce == nonce(2)
    assert len(guard) == 2


def test_a_replay_after_the_window_is_stale_and_its_nonce_is_forgotten() -> None:
    auth = sync.SyncAuth(CLUSTER, SECRET)
    guard = sync.ReplayGuard()
    message = sealed(auth, push_body())
    auth.open(message, kinds=("deltas",), now_ns=NOW, replay=guard)
    later = NOW + 31 * NS_PER_S
    assert (
        rejection(lambda: auth.open(message, kinds=("deltas",), now_ns=later, replay=guard)).reason
        == "stale"
    )
    auth.open(
        sealed(auth, push_body(), n=9, now=NOW + 70 * NS_PER_S),
        kinds=("deltas",),
        now_ns=NOW + 70 * NS_PER_S,
        replay=guard,
    )
    assert len(guard) == 1


def test_rejected_messages_leave_no_nonce_behind() -> None:
    auth = sync.SyncAuth(CLUSTER, SECRET)
    guard = sync.ReplayGuard()
    forged = sealed(sync.SyncAuth(CLUSTER, "wrong"), push_body())
    rejection(lambda: auth.open(forged, kinds=("deltas",), now_ns=NOW, replay=guard))
    assert len(guard) == 0


def test_the_replay_memory_is_bounded_and_fails_closed() -> None:
    guard = sync.ReplayGuard(max_entries=2)
    guard.admit(nonce(1), NOW)
    guard.admit(nonce(2), NOW)
    error = rejection(lambda: guard.admit(nonce(3), NOW))
    assert (error.reason, error.status) == ("replay_cache_full", 503)


def test_a_reply_must_answer_its_request() -> None:
    auth = sync.SyncAuth(CLUSTER, SECRET)
    reply = sealed(auth, sync.encode(sync.Ack("b/n/1", 0)), kind="ack", reply_to=nonce(7))
    assert auth.open(reply, kinds=("ack",), now_ns=NOW, reply_to=nonce(7)).kind == "ack"
    error = rejection(lambda: auth.open(reply, kinds=("ack",), now_ns=NOW, reply_to=nonce(8)))
    assert error.reason == "bad_reply"


def test_a_message_of_another_kind_is_refused() -> None:
    auth = sync.SyncAuth(CLUSTER, SECRET)
    message = sealed(auth, sync.encode(sync.PullRequest([1])), kind="pull")
    assert rejection(lambda: auth.open(message, kinds=("deltas",), now_ns=NOW)).status == 400


@pytest.mark.parametrize("data", [b"", b"\x00", b"not msgpack at all", msgspec.msgpack.encode([1])])
def test_garbage_is_malformed(data: bytes) -> None:
    error = rejection(
        lambda: sync.SyncAuth(CLUSTER, SECRET).open(data, kinds=("deltas",), now_ns=NOW)
    )
    assert (error.reason, error.status) == ("malformed", 400)


def test_a_payload_that_does_not_decode_is_malformed() -> None:
    auth = sync.SyncAuth(CLUSTER, SECRET)
    env = auth.open(sealed(auth, b"\x93\x01"), kinds=("deltas",), now_ns=NOW)
    assert rejection(lambda: sync.decode_body(env)).reason == "malformed"


def test_encode_push_from_pre_encoded_deltas_equals_encoding_the_batch() -> None:
    deltas = [delta("a"), delta("b", {"x/y/1": 5, "z/y/2": 7})]
    rules = {"r": CONFIG}
    whole = sync.encode(sync.DeltaPush(NOW, True, DeltaBatch("a/n/1", deltas, rules)))
    parts = sync.encode_push(NOW, True, "a/n/1", [sync.encode_delta(d) for d in deltas], rules)
    assert parts == whole
    assert msgspec.msgpack.decode(parts, type=sync.DeltaPush).batch.deltas == deltas


# -- digests --------------------------------------------------------------------


SETTLE = 2 * NS_PER_S


def keys_in(range_id: int, count: int) -> list[str]:
    found = []
    n = 0
    while len(found) < count:
        key = f"key-{n}"
        if sync.range_of(key) == range_id:
            found.append(key)
        n += 1
    return found


def test_range_of_is_stable_and_spreads_keys() -> None:
    # crc32 % 256 is part of the wire format: every node must put a key in the same range
    assert sync.range_of("agent-api-key-my-agent-key") == 89
    assert len({sync.range_of(f"key-{n}") for n in range(5000)}) == sync.RANGES


def test_the_digest_ignores_key_order_zero_entries_and_the_rule_label() -> None:
    a = [delta("x", {"a/n/1": 1}), delta("y", {"b/n/1": 2, "a/n/1": 0})]
    b = [msgspec.structs.replace(delta("y", {"b/n/1": 2}), rule=""), delta("x", {"a/n/1": 1})]
    ranges = list(range(sync.RANGES))
    assert sync.digest(a, ranges, NOW, SETTLE) == sync.digest(b, ranges, NOW, SETTLE)


def test_digest_diff_names_exactly_the_ranges_that_differ() -> None:
    left, right = keys_in(3, 2), keys_in(200, 1)
    same = [delta(k) for k in keys_in(17, 3)]
    mine = [*same, delta(left[0], {"a/n/1": 3}), delta(right[0])]
    theirs = [*same, delta(left[0], {"a/n/1": 4}), delta(left[1])]
    ranges = list(range(sync.RANGES))
    diff = sync.differing(
        ranges, sync.digest(mine, ranges, NOW, SETTLE), sync.digest(theirs, ranges, NOW, SETTLE)
    )
    assert diff == [3, 200]


def test_a_missing_entry_shows_even_when_only_one_side_is_settled() -> None:
    key = keys_in(5, 1)[0]
    # T = 1 s: 3 tokens used from base 0 → TAT 3 s, settled from 5 s on; 10 tokens → 12 s.
    now = 6 * NS_PER_S
    full_view = delta(key, {"a/n/1": 3, "b/n/1": 7}, base=0)
    partial_view = delta(key, {"a/n/1": 3}, base=0)
    assert not sync.settled(full_view, now, SETTLE)
    assert sync.settled(partial_view, now, SETTLE)
    ranges = [5]
    assert sync.differing(
        ranges,
        sync.digest([full_view], ranges, now, SETTLE),
        sync.digest([partial_view], ranges, now, SETTLE),
    ) == [5]


def test_busy_and_expired_buckets_are_left_out_of_the_digest() -> None:
    busy = delta("k", {"a/n/1": 3}, base=NOW)  # TAT = now + 3 s
    assert not sync.settled(busy, NOW, SETTLE)
    expired = delta("k", {"a/n/1": 3}, base=NOW - 4000 * NS_PER_S)
    assert not sync.settled(expired, NOW, SETTLE)
    assert sync.digest([busy, expired], [sync.range_of("k")], NOW, SETTLE) == [0]


def test_the_digest_covers_only_the_ranges_asked_for() -> None:
    inside, outside = keys_in(1, 1)[0], keys_in(2, 1)[0]
    hashes = sync.digest([delta(inside), delta(outside)], [1], NOW, SETTLE)
    assert hashes == [sync.entry_hash(delta(inside))]


def test_replicas_that_merged_each_other_have_equal_digests() -> None:
    rule = Rule.create("k-{{ .Request.Query.user }}", 10, 1, name="r")
    a = Limiter([rule], replica_id="a/n/1")
    b = Limiter([rule], replica_id="b/n/1")
    for n in range(50):
        a.acquire(f"k-{n}", 1 + n % 3, now=NOW)
        b.acquire(f"k-{n + 25}", 2, now=NOW + 1)
    a.merge(b.collect_deltas(), now=NOW + 2)
    b.merge(a.collect_deltas(), now=NOW + 2)
    later = NOW + 60 * NS_PER_S
    ranges = list(range(sync.RANGES))
    da = sync.digest(a.full_state().deltas, ranges, later, SETTLE)
    db = sync.digest(b.full_state().deltas, ranges, later, SETTLE)
    assert da == db and any(da)


def test_a_digest_hashed_in_slices_equals_the_digest_hashed_at_once() -> None:
    # the mesh hashes a million buckets a slice at a time between event-loop turns
    states = [delta(key) for r in (3, 7, 200) for key in keys_in(r, 5)]
    ranges = [3, 7, 200, 9]
    whole = sync.digest(states, ranges, NOW, SETTLE)
    combined = [0] * len(ranges)
    for start in range(0, len(states), 4):
        part = sync.digest(states[start : start + 4], ranges, NOW, SETTLE)
        combined = [a ^ b for a, b in zip(combined, part, strict=True)]
    assert combined == whole and all(whole[:3]) and whole[3] == 0


def test_mismatched_digest_lengths_are_malformed() -> None:
    assert rejection(lambda: sync.differing([1, 2], [0], [0, 0])).reason == "malformed"

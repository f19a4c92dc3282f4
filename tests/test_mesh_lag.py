"""Replication lag of a key updated faster than the round trip to a peer stays
bounded by the round trip: a delta that replaces one already in flight starts
its own clock (found by ``bucketmesh xr`` with 40 ms injected between regions,
where the lag of one hot key grew by a second per second)."""

from __future__ import annotations

from bucketmesh.replication.mesh import MeshSettings, Peer

MS = 1_000_000


def peer() -> Peer:
    settings = MeshSettings(
        region="a", cluster_id="c", peers={"b": "http://127.0.0.1:9"}, secret="s"
    )
    return Peer("b", "http://127.0.0.1:9", settings)


def test_a_delta_replacing_one_in_flight_is_timed_from_its_own_collect() -> None:
    p = peer()
    p.offer([("k", b"v1")], {}, 0, 1000)
    keys, chunks, origin = p.take(65536)
    assert origin == 0
    p.offer([("k", b"v2")], {}, 20 * MS, 1000)  # while v1 is in flight
    p.offer([("k", b"v3")], {}, 40 * MS, 1000)
    p.acknowledge(keys, chunks, {})  # v1 acknowledged; v3 still queued
    assert p.take(65536)[2] == 20 * MS  # the oldest change not yet sent, not 0


def test_a_failed_message_keeps_the_older_collect_time() -> None:
    p = peer()
    p.offer([("k", b"v1")], {}, 0, 1000)
    keys, _chunks, _ = p.take(65536)
    p.offer([("k", b"v2")], {}, 20 * MS, 1000)
    p.unsent(keys, _chunks)  # v1 never arrived: v2 must deliver changes from time 0
    assert p.take(65536)[2] == 0


def test_without_a_message_in_flight_a_newer_delta_keeps_the_queued_time() -> None:
    p = peer()
    p.offer([("k", b"v1")], {}, 0, 1000)
    p.offer([("k", b"v2")], {}, 20 * MS, 1000)
    assert p.take(65536)[2] == 0

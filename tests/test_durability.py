"""Durability of the memory backend: snapshot + write-ahead log + new incarnation.

The headline test kills a real ``bucketmesh serve`` with SIGKILL while clients
hammer a few keys, restarts it from its snapshot and log, keeps hammering, and
counts every 200 client-side: over the whole window no key may have granted
more than its capacity plus what refilled meanwhile. Without the log the
restarted node would resume from its last snapshot (taken every 300 ms) and
grant again the hundreds of tokens spent since then.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from conftest import eventually, eventually_async, make_config

from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.http.server import Request
from bucketmesh.node.config import ConfigError, parse_config
from bucketmesh.node.serve import Node, NodeSettings
from bucketmesh.storage.memory import UnreadableState, open_limiter
from bucketmesh.storage.snapshot import SNAPSHOT_MAGIC, SnapshotFile
from bucketmesh.storage.wal import frame, pack, read_segment, recover, segments

CAPACITY = 2500
REFILL = 5.0
KEYS = ("durable-a", "durable-b")
CONNECTIONS = 12


def durable_config(snapshot: Path, durability: str) -> dict[str, Any]:
    return make_config(
        [
            {
                "key": "{{ .Request.Header.X-API-Key }}",
                "name": "durable",
                "capacity": CAPACITY,
                "refillRate": REFILL,
            }
        ],
        storage={
            "backend": "memory",
            "snapshot": str(snapshot),
            "durability": durability,
            "snapshotInterval": 300,
        },
    )


class Load:
    """Keep-alive connections sending POST /v1/rate round-robin over KEYS; counts answers.

    ``ceiling[key]`` bounds how many requests for a key are ever sent, so a phase of the
    load ends where the test says, not where the machine's speed happens to take it.
    """

    def __init__(self) -> None:
        self.granted = dict.fromkeys(KEYS, 0)
        self.denied = dict.fromkeys(KEYS, 0)
        self.sent = dict.fromkeys(KEYS, 0)
        self.ceiling: dict[str, float] = dict.fromkeys(KEYS, math.inf)
        self.broken = 0

    def answered(self, key: str) -> int:
        return self.granted[key] + self.denied[key]

    async def run(self, port: int, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._connection(port, i, stop) for i in range(CONNECTIONS)))

    def _next_key(self, turn: int) -> str | None:
        for offset in range(len(KEYS)):
            key = KEYS[(turn + offset) % len(KEYS)]
            if self.sent[key] < self.ceiling[key]:
                return key
        return None

    async def _connection(self, port: int, index: int, stop: asyncio.Event) -> None:
        requests = {
            key: (
                f"POST /v1/rate HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
            for key in KEYS
        }
        turn = index
        while not stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 10.0
                )
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.01)
                continue
            try:
                while not stop.is_set():
                    key = self._next_key(turn)
                    turn += 1
                    if key is None:  # every key is at its ceiling: wait for the next phase
                        await asyncio.sleep(0.005)
                        continue
                    self.sent[key] += 1
                    writer.write(requests[key])
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30.0)
                    status = int(head[9:12])
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    await asyncio.wait_for(reader.readexactly(length), 30.0)
                    if status == 200:
                        self.granted[key] += 1
                    elif status == 429:
                        self.denied[key] += 1
                    else:
                        raise AssertionError(f"unexpected status {status}")
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                self.broken += 1  # the node was killed mid-request: that answer never came
            finally:
                writer.close()


async def _load_until(
    port: int, load: Load, phases: list[tuple[Any, Any]], finish: Any = None
) -> None:
    """Run the load through ``phases``: for each (start, done), call ``start()``, then wait
    until ``done()`` holds; then ``finish()`` while the load still runs. The deadline only
    stops a broken run from hanging."""
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(port, stop))

    def completed(done: Any) -> None:
        if task.done():  # not retried: the load has failed
            raise RuntimeError(f"the load stopped before its phase completed: {task!r}")
        assert done(), ("phase not completed", load.__dict__)

    try:
        for start, done in phases:
            start()
            await eventually_async(lambda done=done: completed(done), "the phase", 120.0)
        if finish is not None:
            finish()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60.0)


def _snapshot_signature(snapshot: Path) -> tuple[int, int] | None:
    """Which snapshot file is there now (each snapshot is a new file renamed into place)."""
    try:
        info = snapshot.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_mtime_ns)


@pytest.mark.parametrize("durability", ["relaxed", "strict"])
def test_kill_9_under_load_then_restart_grants_no_token_twice(
    serve: Any, tmp_path: Path, durability: str
) -> None:
    snapshot = tmp_path / "data" / "state.snap"
    config = durable_config(snapshot, durability)
    first = serve(config)
    load = Load()
    started = time.monotonic()
    first_third, two_thirds = CAPACITY // 3, 2 * CAPACITY // 3

    # Phase 1: a third of each bucket, every answer in. Phase 2: no request while the
    # node writes two snapshots, so at least one was begun after phase 1 and holds its
    # grants. Phase 3: up to two thirds more; the kill lands at half of each bucket
    # while requests are still in flight, so the grants since that snapshot are in the
    # write-ahead log only. Every phase is counted in what the node answered, not timed.
    seen: list[tuple[int, int] | None] = []

    def limit_sends(n: float) -> Any:
        return lambda: load.ceiling.update(dict.fromkeys(KEYS, n))

    def two_new_snapshots() -> bool:
        now = _snapshot_signature(snapshot)
        if not seen or seen[-1] != now:
            seen.append(now)
        return len(seen) >= 3

    phases = [
        (limit_sends(first_third), lambda: all(load.answered(k) == first_third for k in KEYS)),
        (limit_sends(first_third), two_new_snapshots),
        (limit_sends(two_thirds), lambda: min(load.granted.values()) >= CAPACITY // 2),
    ]
    asyncio.run(_load_until(first.port, load, phases, finish=first.kill))
    before_kill = dict(load.granted)
    assert all(CAPACITY // 2 <= n <= two_thirds for n in before_kill.values()), before_kill
    assert sum(load.denied.values()) == 0, load.denied

    second = serve(config)
    with httpx.Client(base_url=second.base_url, timeout=5.0) as client:
        for key in KEYS:
            state = client.get("/v1/bucket/state", params={"key": key}).json()
            recorded = sum(entry["used"] for entry in state["replicas"].values())
            # Every token a client saw granted is in the restarted node's state.
            assert recorded >= before_kill[key], (key, state, before_kill)

    # Then drain every key until it has refused a run of requests, whatever the speed.
    denied_before = dict(load.denied)
    phases = [
        (
            limit_sends(math.inf),
            lambda: all(load.denied[k] - denied_before[k] >= 50 for k in KEYS),
        )
    ]
    asyncio.run(_load_until(second.port, load, phases))
    elapsed = time.monotonic() - started
    for key, granted in load.granted.items():
        bound = CAPACITY + math.ceil(REFILL * elapsed)
        assert granted <= bound, (key, granted, bound, before_kill)
    # The restarted node did serve, and ran every bucket dry: the bound was tested.
    assert sum(load.granted.values()) > sum(before_kill.values())


def test_clean_stop_leaves_one_segment_and_restart_resumes(serve: Any, tmp_path: Path) -> None:
    snapshot = tmp_path / "state.snap"
    config = durable_config(snapshot, "relaxed")
    first = serve(config)
    with first.client() as client:
        for _ in range(7):
            assert client.post("/v1/rate", headers={"X-API-Key": "clean"}).status_code == 200
    assert first.stop() == 0
    assert len([p for p in snapshot.parent.iterdir() if ".wal." in p.name]) == 1
    second = serve(config)
    with second.client() as client:
        state = client.get("/v1/bucket/state", params={"key": "clean"}).json()
    assert sum(entry["used"] for entry in state["replicas"].values()) == 7


# -- the files themselves, no server ---------------------------------------------


def _rules() -> list[Rule]:
    return [Rule.create("k-{{ .Request.Header.X }}", 10, 0.001, name="k")]


def test_a_torn_log_tail_is_ignored_and_whole_frames_replay(tmp_path: Path) -> None:
    limiter = Limiter(_rules(), replica_id="r/n/1")
    journal = limiter.enable_journal()
    limiter.acquire("k-a", 3)
    assert journal.keys == {"k-a"}
    first = limiter.collect_journal()
    limiter.acquire("k-a", 4)
    second = limiter.collect_journal()
    assert first is not None and second is not None and not journal
    data = frame(first) + frame(second)
    read = read_segment(data + frame(second)[:-3])
    assert read.batches == [first, second] and read.tail == (len(data), len(frame(second)) - 3)
    assert read.tail_torn
    # a whole last frame that fails its check is damage, not a torn write
    # (tests/test_state_files.py: the node refuses to start on it)
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    read = read_segment(bytes(corrupt))
    assert read.batches == [first] and read.tail == (len(frame(first)), len(frame(second)))
    assert not read.tail_torn

    restored = Limiter(_rules(), replica_id="r/n/2")
    for batch in reversed([*read.batches, second]):  # any order: a max-merge
        restored.replay(batch)
    assert restored.acquire("k-a", 4).allowed is False
    assert restored.acquire("k-a", 3).allowed is True


def test_restart_takes_an_incarnation_above_every_writer_of_the_log(tmp_path: Path) -> None:
    path = tmp_path / "state.snap"
    old = Limiter(_rules(), replica_id="r/n/5")
    old.acquire("k-a", 2)
    SnapshotFile(str(path)).save(old.snapshot())
    # incarnation 6 crashed before its first snapshot, after granting 5 tokens
    six = Limiter.restore(old.snapshot(), _rules(), replica_id="r/n/6")
    six.enable_journal()
    six.acquire("k-a", 5)
    batch = six.collect_journal()
    assert batch is not None
    (tmp_path / "state.snap.wal.1").write_bytes(frame(DeltaBatch("r/n/6", [])) + frame(batch))

    limiter, recovered = open_limiter(
        _rules(), region="r", node="n", snapshot=SnapshotFile(str(path))
    )
    assert limiter.replica_id == "r/n/7"
    assert recovered is not None and recovered.writers == {"r/n/6"}
    assert limiter.bucket("k-a") is not None
    assert limiter.bucket("k-a").used("r/n/7") == {"r/n/5": 2, "r/n/6": 5}  # type: ignore[union-attr]
    assert recover(path).torn_bytes == 0


def test_a_snapshot_file_written_in_slices_restores_like_a_whole_one(tmp_path: Path) -> None:
    limiter = Limiter(_rules(), replica_id="r/n/1")
    limiter.stamp_file_rules()  # as a node does at start: the file's versions are kept
    for i in range(25):
        limiter.acquire(f"k-{i}", 1 + i % 9)
    keys = [*limiter.buckets, "k-gone"]
    encoder = msgspec.msgpack.Encoder()
    path = tmp_path / "state.snap"
    path.write_bytes(
        SNAPSHOT_MAGIC
        + pack(limiter.snapshot_head())
        + b"".join(
            pack(encoder.encode(limiter.snapshot_part(keys[i : i + 7])))
            for i in range(0, len(keys), 7)
        )
    )
    from_slices, _ = open_limiter(_rules(), region="r", node="n", snapshot=SnapshotFile(str(path)))
    whole = Limiter.restore(limiter.snapshot(), _rules(), replica_id=from_slices.replica_id)
    assert from_slices.replica_id == "r/n/2"
    assert from_slices.snapshot() == whole.snapshot()
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UnreadableState, match="unreadable snapshot"):
        open_limiter(_rules(), region="r", node="n", snapshot=SnapshotFile(str(path)))


def test_storage_settings_parse_and_a_bad_one_names_its_field() -> None:
    config = parse_config("storage:\n  durability: strict\n  snapshotInterval: 250\n", environ={})
    assert config.storage.durability == "strict"
    assert config.storage.snapshot_interval_ms == 250
    for text, field in (
        ("storage:\n  durability: sometimes\n", "storage.durability"),
        ("storage:\n  snapshotInterval: 0\n", "storage.snapshotInterval"),
    ):
        with pytest.raises(ConfigError) as raised:
            parse_config(text, environ={})
        assert field in str(raised.value), str(raised.value)


# -- the memory bound, on a real server ---------------------------------------------


def test_a_key_flood_stops_at_the_cap_and_idle_buckets_are_reclaimed_after_ttl(
    serve: Any,
) -> None:
    cap = 40
    config = make_config(
        [
            {
                "name": "flood",
                "key": "f-{{ .Request.Header.X-API-Key }}",
                "capacity": 5,
                "refillRate": 100,
                "ttl": 4,
            }
        ],
        limits={"maxBuckets": cap},
    )
    server = serve(config)
    with server.client() as client:

        def rate(key: str) -> httpx.Response:
            return client.post("/v1/rate", headers={"X-API-Key": key})

        statuses = [rate(f"k{i}").status_code for i in range(cap + 15)]
        assert statuses == [200] * cap + [503] * 15
        refused = rate("one-more")
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "1"
        assert rate("k0").status_code == 200  # existing keys keep being served
        assert client.get("/v1/status").json()["buckets"] == cap
        metrics = client.get("/metrics").text
        assert "bucketmesh_bucket_cap_rejections_total 16.0" in metrics

        # Full after 50 ms, idle for 4 s: the sweep drops them (bounded wait, not timed).
        def reclaimed() -> None:
            assert client.get("/v1/status").json()["buckets"] == 0

        eventually(reclaimed, "the idle buckets are reclaimed")
        assert f"bucketmesh_expired_buckets_total {float(cap)}" in client.get("/metrics").text
        assert rate("after-the-flood").status_code == 200


# -- the log under a slow or failing disk (found in review) -----------------------------
#
# These drive a Node's handler in this process (``node.app``: the Rating API, which
# awaits the log's commit barrier before it answers) so that the instant of an fsync
# or of a full disk can be chosen. An fsync of the log's own thread is held at a gate
# (time, not behaviour). A full disk is a real one: the node keeps its files on a tiny
# tmpfs (conftest's ``small_disk``) that the test fills, so the next write that needs a
# page fails with ENOSPC from the kernel, and frees again.

PAD = "k-pad"  # the keys granted only to fill the log's last page to a chosen point


def _grant(key: str, idempotency: str | None = None) -> Request:
    headers = {"content-type": "application/json"}
    if idempotency:
        headers["idempotency-key"] = idempotency
    body = b'{"key":"%s","rule":"k","tokens":3}' % key.encode()
    return Request("POST", "/v1/rate", {}, headers, body, "127.0.0.1", "1.1")


def _node(directory: Path, durability: str) -> Node:
    settings = NodeSettings(
        "r",
        "n",
        "127.0.0.1",
        0,
        _rules(),
        snapshot=str(directory / "state.snap"),
        durability=durability,
        snapshot_interval_s=3600,
    )
    return Node(settings)


def _logged(directory: Path) -> dict[str, list[tuple[str, int]]]:
    """Segment name -> the (key, own used) of every whole frame in it, but the padding."""
    out: dict[str, list[tuple[str, int]]] = {}
    for _, path in segments(directory / "state.snap"):
        out[path.name] = [
            (d.key, max(d.used.values()))
            for b in read_segment(path.read_bytes()).batches
            for d in b.deltas
            if not d.key.startswith(PAD)
        ]
    return out


def _frame_size(replica_id: str, key: str) -> int:
    """The bytes the log takes for a group of one grant (3 tokens) of a fresh ``key``."""
    limiter = Limiter(_rules(), replica_id=replica_id)
    limiter.enable_journal()
    limiter.collect_journal()  # the group that opens the log: the rules in effect
    limiter.acquire(key, 3)
    batch = limiter.collect_journal()
    assert batch is not None
    return len(frame(batch))


async def _pad_log(node: Node, room: int, page: int) -> None:
    """Grant fresh keys, each as long as it takes, until the open log segment's last page
    has exactly ``room`` bytes free (each group's size is checked as it is written)."""
    assert node.memory is not None
    ((_, segment),) = segments(Path(node.settings.snapshot or ""))
    replica = node.memory.replica_id
    # the group that opens the log (the rules in effect) goes out with the first grant
    opened = await node.app(_grant(PAD + "open"))  # type: ignore[misc]
    assert opened.status == 200, opened.body
    sizes = {_frame_size(replica, PAD + "x" * n): n for n in range(4, 600)}  # frame: n
    for turn in range(100):
        need = (-segment.stat().st_size - room) % page  # bytes to write still
        if need == 0:
            return
        # one step lands on it exactly, or two do, or a large one comes closer (or wraps)
        steps = (s for s in sizes if s == need or need - s in sizes)
        size = next(steps, max(sizes))
        key = f"{PAD}{turn:02d}" + "x" * (sizes[size] - 2)  # as long as PAD + n x's
        before = segment.stat().st_size
        answer = await node.app(_grant(key))  # type: ignore[misc]
        assert answer.status == 200, answer.body
        assert segment.stat().st_size - before == size, (key, size)
    raise AssertionError(f"could not leave {room} bytes in the log's last page")


def test_strict_grants_queued_behind_an_fsync_are_fsynced_before_their_200_when_the_log_rotates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    waiting = threading.Event()  # an fsync of the log is held at the gate
    synced: list[tuple[str, int]] = []  # (segment, size) each log fsync made durable
    real_fsync = os.fsync

    def gated_fsync(fd: int) -> None:
        if threading.current_thread().name.startswith("bucketmesh-wal"):
            waiting.set()
            gate.wait(60)
            synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", gated_fsync)

    async def scenario() -> tuple[int, int]:
        node = _node(tmp_path, "strict")
        handler = node.app
        first = handler(_grant("k-a"))

        def held() -> None:
            assert waiting.is_set()

        await eventually_async(held, "k-a's group is written, its fsync held at the gate")
        second = handler(_grant("k-b"))  # the next group, formed behind that fsync
        snapshot = asyncio.ensure_future(node.save_snapshot())

        def rotated() -> None:  # the snapshot rotates the log meanwhile (and may be done)
            assert segments(tmp_path / "state.snap")[-1][0] >= 2

        await eventually_async(rotated, "the snapshot starts a new segment")
        gate.set()
        a, b = await first, await second  # type: ignore[misc]
        await snapshot
        assert node.memory is not None
        node.memory.close()
        return a.status, b.status

    assert asyncio.run(scenario()) == (200, 200)
    where = {key: name for name, entries in _logged(tmp_path).items() for key, _ in entries}
    # the snapshot retired k-a's segment; k-b's group went to the new one and was
    # fsynced there (up to at least its end) before k-b was answered
    segment = where["k-b"]
    size = (tmp_path / segment).stat().st_size
    assert any(name == segment and at >= size for name, at in synced), (synced, segment, size)


@pytest.mark.parametrize("written", ["nothing", "half"], ids=["nothing-written", "half-a-frame"])
def test_a_failed_log_write_answers_503_and_the_next_group_carries_it_readably(
    small_disk: Any, written: str
) -> None:
    async def scenario() -> tuple[list[int], int]:
        node = _node(small_disk.path, "relaxed")
        assert node.memory is not None and node.memory.wal is not None
        try:
            # The disk fills up with k-a's frame the next to be written: either no byte
            # of it fits, or the half that fits in the page the log has begun.
            half = _frame_size(node.memory.replica_id, "k-a") // 2
            await _pad_log(node, half if written == "half" else 0, small_disk.page)
            small_disk.fill()
            failed = await node.app(_grant("k-a"))  # type: ignore[misc]
            small_disk.free()
            later = await node.app(_grant("k-b"))  # type: ignore[misc]
            return [failed.status, later.status], node.memory.wal.write_errors
        finally:
            node.memory.close()

    assert asyncio.run(scenario()) == ([503, 200], 1)
    recovered = recover(small_disk.path / "state.snap")
    assert recovered.torn_bytes == 0  # the half frame was cut off, not written behind
    used = {d.key: d.used for b in recovered.batches for d in b.deltas if not d.key.startswith(PAD)}
    # k-a's tokens stay spent (the 503 said "not durable", not "not granted") and
    # reached the log with k-b's group: a restart cannot grant them again
    assert set(used) == {"k-a", "k-b"} and all(max(u.values()) == 3 for u in used.values())


def test_an_idempotent_retry_of_a_grant_that_was_not_made_durable_is_decided_again(
    small_disk: Any,
) -> None:
    async def scenario() -> list[tuple[int, int]]:
        node = _node(small_disk.path, "relaxed")
        assert node.memory is not None
        try:
            await _pad_log(node, 0, small_disk.page)
            small_disk.fill()
            out = []
            for _ in range(2):
                answer = await node.app(_grant("k-a", idempotency="retry-1"))  # type: ignore[misc]
                remaining = json.loads(answer.body).get("tokens_remaining", -1)
                out.append((answer.status, remaining))
                small_disk.free()  # the disk has room again for the retry
            return out
        finally:
            node.memory.close()

    first, retry = asyncio.run(scenario())
    assert first == (503, -1)
    # not the cached 200 of the first decision (which was never logged): decided
    # again, so it spends again (10 - 3 - 3), and this time it is logged
    assert retry == (200, 4)
    logged = {key: n for entries in _logged(small_disk.path).values() for key, n in entries}
    assert logged == {"k-a": 6}


def test_snapshots_that_keep_failing_add_no_segments_and_leak_no_descriptors(
    small_disk: Any,
) -> None:
    snapshot = small_disk.path / "state.snap"

    def wal_fds() -> int:
        fds = Path("/proc/self/fd").iterdir()
        mine = str(snapshot) + ".wal."
        return sum(os.readlink(str(fd)).startswith(mine) for fd in fds if fd.exists())

    def leftovers() -> list[str]:  # snapshots begun and never finished
        return [p.name for p in small_disk.path.iterdir() if ".tmp-" in p.name]

    async def scenario() -> tuple[list[int], list[tuple[int, int]], set[str]]:
        node = _node(small_disk.path, "relaxed")
        assert node.memory is not None
        try:
            # One free page: the first snapshot's rotation takes it for the new log
            # segment (whose first page then holds every later grant), and the snapshot
            # file itself finds no room, then or at any later interval.
            small_disk.fill(leave_pages=1)
            statuses, counts = [], []
            for i in range(8):
                statuses.append((await node.app(_grant(f"k-{i}"))).status)  # type: ignore[misc]
                with pytest.raises(OSError) as full:
                    await node.save_snapshot()
                assert full.value.errno == errno.ENOSPC, full.value
                counts.append((len(segments(snapshot)), wal_fds()))
            assert leftovers() == []
            logged = {key for entries in _logged(small_disk.path).values() for key, _ in entries}
            # Room again: the next snapshot succeeds and retires every segment before it.
            small_disk.free()
            await node.save_snapshot()
            counts.append((len(segments(snapshot)), wal_fds()))
            return statuses, counts, logged
        finally:
            node.memory.close()

    statuses, counts, logged = asyncio.run(scenario())
    assert statuses == [200] * 8
    assert counts == [(2, 1)] * 8 + [(1, 1)], counts
    assert logged == {f"k-{i}" for i in range(8)}  # while no snapshot could be written
    assert leftovers() == []
    # and every grant is in the snapshot or the log: a restart holds all of them
    limiter, _ = open_limiter(_rules(), region="r", node="n", snapshot=SnapshotFile(str(snapshot)))
    for i in range(8):
        bucket = limiter.bucket(f"k-{i}")
        assert bucket is not None and sum(bucket.used(limiter.replica_id).values()) == 3, i


def test_a_snapshot_a_crash_left_half_written_is_removed_at_start(tmp_path: Path) -> None:
    store = SnapshotFile(str(tmp_path / "state.snap"))
    writer = store.begin()
    writer.write(b"x" * 1000)  # kill -9 here: never committed, never abandoned
    other = tmp_path / ".other.snap.tmp-1"  # another node's temporary: not ours
    other.write_bytes(b"y")
    open_limiter(_rules(), region="r", node="n", snapshot=store)
    assert not writer.tmp.exists() and other.exists()


def test_a_log_group_that_cannot_be_encoded_answers_503_and_never_hangs(tmp_path: Path) -> None:
    """A bug that leaves a bucket outside the wire format (issue 12, case 1) must not
    leave the grant or PATCH waiting on the log's barrier for ever: its group's waiters
    get "not durable" (503), the failure is counted and /readyz names the log."""

    async def scenario() -> tuple[int, int, str, int]:
        node = _node(tmp_path, "relaxed")
        assert node.memory is not None and node.memory.wal is not None
        try:
            first = await node.app(_grant("k-a"))  # type: ignore[misc]
            assert first.status == 200, first.body
            bucket = node.memory.limiter.buckets["k-a"]
            bucket.epoch = 2**70  # beyond msgpack's 64-bit integers
            # hang guard only: before the fix the barrier's future never resolved
            broken = await asyncio.wait_for(node.app(_grant("k-a")), 60)  # type: ignore[arg-type]
            ready = node.readiness()["store"]
            del node.memory.limiter.buckets["k-a"]
            later = await asyncio.wait_for(node.app(_grant("k-b")), 60)  # type: ignore[arg-type]
            return broken.status, later.status, ready, node.memory.wal.write_errors
        finally:
            node.memory.close()

    broken, later, ready, errors = asyncio.run(scenario())
    assert (broken, later, errors) == (503, 200, 1)
    assert ready.startswith("write-ahead log failing"), ready

"""The memory backend's files under damage and misuse (issue 22, items 1 and 2).

A damaged frame in the middle of a write-ahead log segment must not hand back the
tokens of every frame after it: frames carry absolute values, so the reader skips
the damaged bytes, reads on, and says what it skipped. Damage the reader cannot
read past (a whole frame that fails its check, with no frame after it: not the
shape of a write a crash cut short) stops the node with an error naming the file
and the offset. Two nodes on one snapshot path would delete each other's log
segments: the second refuses to start, naming the path and the holder.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually, make_config

from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.storage.memory import UnreadableState, open_limiter
from bucketmesh.storage.snapshot import SnapshotFile
from bucketmesh.storage.wal import DamagedLog, frame, read_segment, recover, segments

CAPACITY = 100


def _config(snapshot: Path, **node: Any) -> dict[str, Any]:
    return make_config(
        [
            {
                "name": "damage",
                "key": "{{ .Request.Header.X-API-Key }}",
                "capacity": CAPACITY,
                # one token per 1000 s: no refill a test could see
                "refillRate": 0.001,
            }
        ],
        storage={
            "backend": "memory",
            "snapshot": str(snapshot),
            "durability": "relaxed",
            # no snapshot while the test runs: every grant stays in the log
            "snapshotInterval": 3_600_000,
        },
        **node,
    )


def _exits_before_listening(server: Any) -> tuple[int, str]:
    """The exit code and stderr of a server that must refuse to start."""

    def settled() -> None:  # it exits, or (the bug) it listens
        assert not server.alive() or server.listening()

    eventually(settled, f"{server.name} exits or listens")
    assert not server.listening(), server.describe()
    code = server.wait()
    said = server.stderr()
    assert "Traceback" not in said, said
    return code, said


def _frame_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, length of payload) of each frame of an undamaged segment."""
    out = []
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "little")
        out.append((offset, length))
        offset += 8 + length
    assert offset == len(data)
    return out


@pytest.mark.parametrize("where", ["payload", "length"])
def test_a_damaged_frame_mid_log_costs_no_later_frame(
    serve: Any, tmp_path: Path, where: str
) -> None:
    snapshot = tmp_path / "data" / "state.snap"
    config = _config(snapshot)
    first = serve(config)
    with first.client() as client:
        for _ in range(60):
            granted = client.post("/v1/rate", headers={"X-API-Key": "k"})
            assert granted.status_code == 200, granted.text
    first.kill()  # kill -9: no final snapshot, every grant is in the log only

    ((_, path),) = segments(snapshot)
    data = bytearray(path.read_bytes())
    frames = _frame_offsets(bytes(data))
    assert len(frames) == 61, len(frames)  # the header, then one group per grant
    offset, length = frames[10]
    if where == "payload":
        data[offset + 8 + length // 2] ^= 0xFF
    else:  # the length's high byte: the frame claims 16 MiB more than it has
        data[offset + 3] ^= 0x01
    path.write_bytes(bytes(data))

    second = serve(config)
    with second.client() as client:
        state = client.get("/v1/bucket/state", params={"key": "k"}).json()
        assert state["tokens_remaining"] == CAPACITY - 60, state
        statuses = [
            client.post("/v1/rate", headers={"X-API-Key": "k"}).status_code
            for _ in range(CAPACITY - 60 + 1)
        ]
    assert statuses == [200] * (CAPACITY - 60) + [429], statuses
    said = second.stderr()
    assert f"{path}: skipped" in said and f"at offset {offset}" in said, said
    assert "torn" not in said, said
    assert second.stop(signal.SIGTERM) == 0


def test_a_damaged_last_frame_stops_the_node_with_the_file_and_the_cure(
    serve: Any, tmp_path: Path
) -> None:
    snapshot = tmp_path / "data" / "state.snap"
    config = _config(snapshot)
    first = serve(config)
    with first.client() as client:
        for _ in range(60):
            assert client.post("/v1/rate", headers={"X-API-Key": "k"}).status_code == 200
    first.kill()

    ((_, path),) = segments(snapshot)
    data = bytearray(path.read_bytes())
    offset, length = _frame_offsets(bytes(data))[-1]
    data[offset + 8 + length // 2] ^= 0xFF  # whole, failing its check: not a torn write
    path.write_bytes(bytes(data))

    refused = serve(config, wait_ready=False)
    code, said = _exits_before_listening(refused)
    assert code != 0, refused.describe()
    assert f"{path}: damaged write-ahead log frame at offset {offset}" in said, said
    assert f"truncate -s {offset} {path}" in said, said

    # The operator accepts the loss of that one group (one grant here), as told.
    with path.open("r+b") as log:
        log.truncate(offset)
    second = serve(config)
    with second.client() as client:
        state = client.get("/v1/bucket/state", params={"key": "k"}).json()
    assert state["tokens_remaining"] == CAPACITY - 59, state


# -- one snapshot path, one process ----------------------------------------------------


def test_a_second_node_on_the_same_snapshot_path_refuses_to_start(
    serve: Any, tmp_path: Path
) -> None:
    snapshot = tmp_path / "data" / "state.snap"
    first = serve(_config(snapshot))
    with first.client() as client:
        for _ in range(7):
            assert client.post("/v1/rate", headers={"X-API-Key": "k"}).status_code == 200

    second = serve(_config(snapshot, node="node-b"), wait_ready=False)
    code, said = _exits_before_listening(second)
    assert code != 0, second.describe()
    # it names the path and who holds it
    assert f"{snapshot}.lock" in said, said
    assert f"pid {first.process.pid}" in said and "us-east-1/node-a" in said, said

    # The holder was not disturbed, and a kill -9 does not leave the lock behind: the
    # next node on the path starts, with every grant the first one made.
    with first.client() as client:
        assert client.post("/v1/rate", headers={"X-API-Key": "k"}).status_code == 200
    first.kill()
    third = serve(_config(snapshot, node="node-b"))
    with third.client() as client:
        state = client.get("/v1/bucket/state", params={"key": "k"}).json()
    assert state["tokens_remaining"] == CAPACITY - 8, state


# -- a snapshot abandoned on a full disk leaves no temporary behind -----------------


def test_abandoning_a_snapshot_on_a_full_disk_removes_its_temporary(small_disk: Any) -> None:
    store = SnapshotFile(str(small_disk.path / "state.snap"))
    writer = store.begin()
    writer.write(b"x" * 1000)  # buffered in the process: the file has no page yet
    small_disk.fill()  # so closing it must flush into a page the disk does not have
    raised: OSError | None = None
    try:
        writer.abandon()
    except OSError as error:
        raised = error
    leftovers = [p.name for p in small_disk.path.iterdir() if ".tmp-" in p.name]
    assert (leftovers, raised) == ([], None)
    small_disk.free()


# -- the reader, on bytes ------------------------------------------------------------


def _rules() -> list[Rule]:
    return [Rule.create("k-{{ .Request.Header.X }}", 10, 0.001, name="k")]


def _groups(keys: list[str], replica: str = "r/n/1") -> list[DeltaBatch]:
    """A log's groups as a node writes them: the header, then one per grant."""
    limiter = Limiter(_rules(), replica_id=replica)
    limiter.enable_journal()
    out = [DeltaBatch(replica, [])]
    for key in keys:
        assert limiter.acquire(key, 1).allowed
        batch = limiter.collect_journal()
        assert batch is not None
        out.append(batch)
    return out


def _segment(groups: list[DeltaBatch]) -> tuple[bytearray, list[int]]:
    """The segment's bytes and where each frame starts."""
    data = bytearray()
    starts = []
    for group in groups:
        starts.append(len(data))
        data += frame(group)
    return data, starts


def test_the_reader_skips_a_frame_with_a_damaged_payload_and_reads_on() -> None:
    groups = _groups(["k-a"] * 6)
    data, starts = _segment(groups)
    data[starts[3] + 12] ^= 0x01
    read = read_segment(bytes(data))
    assert read.batches == groups[:3] + groups[4:]
    assert read.skipped == [(starts[3], starts[4] - starts[3])]
    assert read.tail is None


@pytest.mark.parametrize("damage", [0x01, 0x80, 0xFF], ids=["16MiB-more", "2GiB-more", "less"])
def test_the_reader_finds_the_next_frame_after_a_damaged_length(damage: int) -> None:
    groups = _groups(["k-a", "k-b", "k-a", "k-c", "k-a"])
    data, starts = _segment(groups)
    if damage == 0xFF:  # the frame claims fewer bytes than it has
        data[starts[2]] ^= 0x0F
    else:  # the length's high bytes: it claims more than the file holds
        data[starts[2] + 3] ^= damage
    read = read_segment(bytes(data))
    assert read.batches == groups[:2] + groups[3:]
    assert read.skipped == [(starts[2], starts[3] - starts[2])]
    assert read.tail is None


def test_the_reader_reads_past_a_damaged_first_frame_and_two_damaged_frames() -> None:
    groups = _groups(["k-a", "k-b", "k-c", "k-d", "k-e"])
    data, starts = _segment(groups)
    data[starts[0] + 2] ^= 0x40  # the header: the writer's name is not known yet
    data[starts[2] + 9] ^= 0x01
    data[starts[3] + 1] ^= 0x20
    read = read_segment(bytes(data))
    assert read.batches == [groups[1], groups[4], groups[5]]
    assert read.skipped == [
        (starts[0], starts[1]),
        (starts[2], starts[4] - starts[2]),
    ]


def test_a_skipped_frame_costs_what_only_it_held() -> None:
    """Frames hold absolute values: a key granted again later loses nothing; a key
    whose last grant was in the damaged group falls back to its previous frame."""
    groups = _groups(["k-a", "k-b", "k-a", "k-b", "k-a"])  # frames 1..5
    data, starts = _segment(groups)
    data[starts[4] + 12] ^= 0x01  # k-b's second (and last) grant
    (_, *read) = read_segment(bytes(data)).batches
    restored = Limiter(_rules(), replica_id="r/n/2")
    for batch in read:
        restored.replay(batch)
    assert restored.acquire("k-a", 0).tokens_remaining == 7  # all 3 grants held
    assert restored.acquire("k-b", 0).tokens_remaining == 9  # 1 of 2: one is lost


@pytest.mark.parametrize("shape", ["half-a-header", "half-a-frame", "zeros", "zero-filled-end"])
def test_a_tail_cut_short_is_torn_and_ignored(tmp_path: Path, shape: str) -> None:
    groups = _groups(["k-a", "k-b", "k-a"])
    data, _ = _segment(groups)
    whole = len(data)
    last = frame(groups[1])
    data += {
        "half-a-header": last[:5],
        "half-a-frame": last[: len(last) // 2],
        "zeros": bytes(300),  # a file grown by writes whose data never reached the disk
        "zero-filled-end": last[: len(last) // 2] + bytes(len(last) - len(last) // 2),
    }[shape]
    read = read_segment(bytes(data))
    assert read.batches == groups and read.skipped == []
    assert read.tail == (whole, len(data) - whole) and read.tail_torn

    (tmp_path / "state.snap.wal.1").write_bytes(bytes(data))
    recovered = recover(tmp_path / "state.snap")
    assert recovered.batches == groups and recovered.torn_bytes == len(data) - whole


def test_damage_at_the_end_of_a_segment_stops_the_node_naming_file_and_offset(
    tmp_path: Path,
) -> None:
    groups = _groups(["k-a", "k-b", "k-a"])
    data, starts = _segment(groups)
    data[starts[3] + 10] ^= 0x01  # the last frame: whole, and failing its check
    for seq in (1, 2):  # the last segment, and one before it: damage either way
        path = tmp_path / f"state.snap.wal.{seq}"
        path.write_bytes(bytes(data))
        later = tmp_path / "state.snap.wal.3"
        if seq == 2:
            path.rename(later)
            (tmp_path / "state.snap.wal.1").write_bytes(bytes(data))
        read = read_segment(bytes(data))
        assert read.tail == (starts[3], len(data) - starts[3]) and not read.tail_torn
        with pytest.raises(DamagedLog) as raised:
            recover(tmp_path / "state.snap")
        said = str(raised.value)
        assert f"state.snap.wal.1: damaged write-ahead log frame at offset {starts[3]}" in said
        assert f"truncate -s {starts[3]} " in said
        with pytest.raises(UnreadableState) as unreadable:
            open_limiter(
                _rules(), region="r", node="n", snapshot=SnapshotFile(str(tmp_path / "state.snap"))
            )
        assert str(unreadable.value) == said
        for stale in tmp_path.iterdir():
            stale.unlink()


def test_damage_in_an_earlier_segment_is_read_past_and_later_segments_replay(
    tmp_path: Path,
) -> None:
    first = _groups(["k-a"] * 4)
    data, starts = _segment(first)
    data[starts[2] + 20] ^= 0x04
    (tmp_path / "state.snap.wal.1").write_bytes(bytes(data))
    second = _groups(["k-b"] * 2, replica="r/n/2")
    (tmp_path / "state.snap.wal.2").write_bytes(b"".join(frame(g) for g in second))
    recovered = recover(tmp_path / "state.snap")
    assert recovered.batches == first[:2] + first[3:] + second
    assert [(u.path.name, u.offset, u.length) for u in recovered.skipped] == [
        ("state.snap.wal.1", starts[2], starts[3] - starts[2])
    ]
    assert recovered.torn == [] and recovered.writers == {"r/n/1", "r/n/2"}
    limiter, _ = open_limiter(
        _rules(), region="r", node="n", snapshot=SnapshotFile(str(tmp_path / "state.snap"))
    )
    assert limiter.replica_id == "r/n/3"
    assert limiter.acquire("k-a", 0).tokens_remaining == 6  # a peek
    assert limiter.acquire("k-b", 0).tokens_remaining == 8

"""The fault-injecting TCP proxy: it forwards bytes intact, delays them by at
least the configured latency, black-holes a cut link and recovers on heal; and
a local mesh behind it partitions and converges again."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import eventually

from bucketmesh.core.rules import hashed_value
from bucketmesh.tooling.cluster import LocalMesh
from bucketmesh.tooling.netproxy import Faults, NetProxy


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A real TCP echo server on a free loopback port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    thread.join(5)
    listener.close()


@pytest.fixture
def proxy() -> Iterator[NetProxy]:
    proxy = NetProxy(seed=1)
    yield proxy
    proxy.close()


def roundtrip(port: int, payload: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def test_bytes_pass_intact_and_in_order_through_jitter_and_loss(
    echo_server: int, proxy: NetProxy
) -> None:
    link = proxy.add("a", "b", ("127.0.0.1", echo_server), Faults(0.005, 0.004, 0.2))
    payload = bytes(range(256)) * 4000  # ~1 MB: many chunks, some "lost" and retransmitted
    received, _ = roundtrip(link.port, payload)
    assert received == payload


def test_latency_is_a_floor_on_the_round_trip(echo_server: int, proxy: NetProxy) -> None:
    link = proxy.add("a", "b", ("127.0.0.1", echo_server), Faults(latency_s=0.1))
    received, elapsed = roundtrip(link.port, b"ping")
    assert received == b"ping"
    # one latency each way: the proxy can never deliver earlier than scheduled
    assert elapsed >= 0.2


def test_a_cut_link_is_a_black_hole_until_healed(echo_server: int, proxy: NetProxy) -> None:
    link = proxy.add("a", "b", ("127.0.0.1", echo_server))
    proxy.add("c", "d", ("127.0.0.1", echo_server))
    assert proxy.cut(["b"]) == ["a→b"]
    with pytest.raises(TimeoutError):
        roundtrip(link.port, b"lost", timeout=0.5)
    # the link that does not touch the cut region still works
    assert roundtrip(proxy.links["c→d"].port, b"other")[0] == b"other"
    proxy.heal()
    assert roundtrip(link.port, b"back")[0] == b"back"


def state(url: str, key: str) -> dict[str, object]:
    response = httpx.get(f"{url}/v1/bucket/state", params={"key": key}, timeout=5)
    response.raise_for_status()
    return dict(response.json())


def test_partitioned_region_serves_alone_and_converges_after_heal(tmp_path: Path) -> None:
    """``cluster up``'s own mesh (``LocalMesh``) with its proxies."""
    mesh = LocalMesh(["r1", "r2", "r3"], directory=str(tmp_path), faults=Faults(latency_s=0.02))
    try:
        assert mesh.start()
        urls = mesh.urls
        key = "agent-api-key-" + hashed_value("netproxy")  # the example rule's | sha256

        def local_only(region: str) -> bool:
            reply = httpx.get(f"{urls[region]}/v1/status", timeout=5)
            return bool(reply.json()["sync"]["local_only"])

        def connected() -> None:
            assert not any(local_only(region) for region in urls)

        eventually(connected, "every region reaches a peer")
        assert sorted(mesh.cut(["r3"])) == ["r1→r3", "r2→r3", "r3→r1", "r3→r2"]

        def cut_off() -> None:
            assert local_only("r3")

        eventually(cut_off, "the cut region goes local-only")
        for region in ("r1", "r3"):
            for _ in range(10):
                reply = httpx.get(
                    f"{urls[region]}/v1/rate", headers={"X-API-Key": "netproxy"}, timeout=5
                )
                assert reply.status_code == 200

        def r2_heard_of_r1() -> None:
            assert state(urls["r2"], key)["replicas"]

        # r3 does not see r1's spending while cut off, though r2 has heard of it
        eventually(r2_heard_of_r1, "r2 hears of r1")
        r3_view = state(urls["r3"], key)["replicas"]
        assert all(rid.startswith("r3/") for rid in r3_view)  # type: ignore[union-attr]
        mesh.heal()

        def converged() -> None:
            views = [state(url, key)["replicas"] for url in urls.values()]
            assert all(view == views[0] for view in views), views
            assert len(views[0]) == 2, views  # type: ignore[arg-type]

        eventually(converged, "every region holds r1's and r3's spending")
    finally:
        mesh.stop()

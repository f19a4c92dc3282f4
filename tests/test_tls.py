"""TLS and mTLS on real ``bucketmesh serve`` processes, with certificates the tests
make (trustme): the API over https, the sync mesh over https with client
certificates, and every refusal (a wrong CA, an expired certificate, a missing
client certificate, a certificate naming no region) refused and counted under
``bucketmesh_tls_refused_total``. Certificate files are replaced under a running
mesh to show that they are reloaded without a restart."""

from __future__ import annotations

import datetime
import os
import re
import secrets
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from conftest import MESH_CLUSTER_ID as CLUSTER_ID
from conftest import SEED_RULE, Server, ServerFactory, eventually, free_port, make_config

from bucketmesh.replication import protocol as sync

HOSTS = ("127.0.0.1", "localhost")


class Pki:
    """A CA of the mesh, a foreign CA, and helpers to write certificates as files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.foreign = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)  # atomic, as a mounted Secret is updated
        return str(path)

    def leaf(
        self, name: str, *identities: str, ca: trustme.CA | None = None, expired: bool = False
    ) -> tuple[str, str]:
        """Write ``name``.pem (chain) and ``name``-key.pem; return their paths."""
        kwargs: dict[str, Any] = {}
        if expired:
            now = datetime.datetime.now(datetime.timezone.utc)
            kwargs = {
                "not_before": now - datetime.timedelta(days=30),
                "not_after": now - datetime.timedelta(days=1),
            }
        cert = (ca or self.ca).issue_cert(*identities, common_name=identities[0], **kwargs)
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        return (
            self._write(f"{name}.pem", chain),
            self._write(f"{name}-key.pem", cert.private_key_pem.bytes()),
        )

    def client_context(self, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if cert is not None:
            context.load_cert_chain(*cert)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    return Pki(directory)


def https(server: Server | int, path: str) -> str:
    port = server if isinstance(server, int) else server.port
    return f"https://127.0.0.1:{port}{path}"


def wait_https_ready(server: Server, context: ssl.SSLContext) -> None:
    def ready() -> bool:
        assert server.alive(), server.describe()
        response = httpx.get(https(server, "/readyz"), verify=context, timeout=5)
        return response.status_code == 200

    eventually(ready, f"{server.name} answers /readyz over https")


def refused(server: Server, context: ssl.SSLContext, side: str, reason: str) -> float:
    text = httpx.get(https(server, "/metrics"), verify=context, timeout=5).text
    match = re.search(
        rf'^bucketmesh_tls_refused_total\{{reason="{reason}",side="{side}"\}} (\S+)$', text, re.M
    )
    return float(match.group(1)) if match else 0.0


def handshake_fails(server: Server, context: ssl.SSLContext) -> None:
    """A request over ``context`` fails: the handshake, or the first read after it
    (TLS 1.3 verifies a client certificate after the client has finished)."""
    with pytest.raises(httpx.HTTPError):
        httpx.get(https(server, "/v1/status"), verify=context, timeout=5)


def test_api_over_tls_refuses_and_counts_bad_client_certificates(
    serve: ServerFactory, pki: Pki
) -> None:
    cert = pki.leaf("node", *HOSTS)
    config = make_config(
        sync={"enabled": True, "peers": ["us-east-1"]},  # a mesh of one: sync endpoints on
        tls={
            "certFile": cert[0],
            "keyFile": cert[1],
            "caFile": pki.ca_file,
            "clientAuth": "sync",
        },
    )
    server = serve(config, wait_ready=False, env={"BUCKETMESH_SYNC_SECRET": "s" * 32})
    plain = pki.client_context()
    wait_https_ready(server, plain)

    # an API client needs no certificate with clientAuth: sync
    answer = httpx.post(
        https(server, "/v1/rate"), headers={"X-API-Key": "k1"}, json={"tokens": 1}, verify=plain
    )
    assert answer.status_code == 200, answer.text
    # but the sync endpoints do: 403, counted
    denied = httpx.post(https(server, "/v1/sync/deltas"), content=b"x", verify=plain)
    assert denied.status_code == 403, denied.text
    assert "client certificate" in denied.json()["detail"]
    assert refused(server, plain, "server", "no_client_cert") == 1

    # a certificate from another CA, and an expired one from the right CA: no handshake
    handshake_fails(server, pki.client_context(pki.leaf("foreign", "eu", ca=pki.foreign)))
    eventually(lambda: refused(server, plain, "server", "unknown_ca") == 1, "wrong CA counted")
    handshake_fails(server, pki.client_context(pki.leaf("old", "eu", expired=True)))
    eventually(lambda: refused(server, plain, "server", "expired") == 1, "expired counted")

    # a client that does not trust the server's CA refuses it (the server sees the alert)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https(server, "/v1/status"), verify=ssl.create_default_context())
    # plain HTTP to a TLS port is no request at all
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/v1/status", timeout=5)
    eventually(lambda: refused(server, plain, "server", "not_tls") == 1, "plain http counted")

    # a certificate the CA signed reaches the sync endpoint (and gets the protocol's 400)
    signed = pki.client_context(pki.leaf("peer", "eu"))
    reached = httpx.post(https(server, "/v1/sync/deltas"), content=b"x", verify=signed)
    assert reached.status_code == 400, reached.text
    assert server.alive()


def test_client_auth_all_refuses_a_client_without_certificate(
    serve: ServerFactory, pki: Pki
) -> None:
    cert = pki.leaf("node", *HOSTS)
    tls = {"certFile": cert[0], "keyFile": cert[1], "caFile": pki.ca_file, "clientAuth": "all"}
    server = serve(make_config(tls=tls), wait_ready=False)
    with_cert = pki.client_context(pki.leaf("client", "ops"))
    wait_https_ready(server, with_cert)
    handshake_fails(server, pki.client_context())
    eventually(
        lambda: refused(server, with_cert, "server", "no_client_cert") == 1,
        "missing client certificate counted",
    )


def test_config_names_the_tls_field_at_fault(
    serve: ServerFactory, pki: Pki, tmp_path: Path
) -> None:
    cert = pki.leaf("node", *HOSTS)
    other = pki.leaf("other", *HOSTS)
    cases = [
        ({"certFile": cert[0], "keyFile": other[1]}, "tls.keyFile"),
        ({"certFile": cert[0], "keyFile": cert[1], "clientAuth": "sync"}, "tls.caFile"),
        ({"certFile": str(tmp_path / "missing.pem"), "keyFile": cert[1]}, "tls.certFile"),
        ({"certFile": cert[0], "keyFile": cert[1], "clientAuth": "sometimes"}, "tls.clientAuth"),
    ]
    for tls, field in cases:
        server = serve(make_config(tls=tls), wait_ready=False)
        assert server.wait() == 2, server.describe()
        assert f"{field}" in server.stderr(), (field, server.stderr())
        assert "Traceback" not in server.stderr()


# -- a three-region mesh over https with mutual authentication -------------------------

REGIONS = ("us-east-1", "eu-west-1", "ap-south-1")


def start_mesh(
    serve: ServerFactory, pki: Pki, secret: str, *, pin: bool = True
) -> dict[str, tuple[Server, tuple[str, str]]]:
    ports = {region: free_port() for region in REGIONS}
    nodes: dict[str, tuple[Server, tuple[str, str]]] = {}
    for region in REGIONS:
        cert = pki.leaf(region, region, *HOSTS)
        config = make_config(
            [SEED_RULE],
            region=region,
            sync={
                "enabled": True,
                "peers": list(REGIONS),
                "peerUrls": {r: f"https://127.0.0.1:{p}" for r, p in ports.items() if r != region},
                "interval": 20,
                "peerTimeout": 500,
            },
            tls={
                "certFile": cert[0],
                "keyFile": cert[1],
                "caFile": pki.ca_file,
                "clientAuth": "sync",
                "pinRegions": pin,
                "maxConnectionAge": 500,  # ms: certificate changes reach the links soon
            },
        )
        server = serve(
            config,
            name=region,
            port=ports[region],
            env={"BUCKETMESH_SYNC_SECRET": secret},
            wait_ready=False,
        )
        nodes[region] = (server, cert)
    context = pki.client_context()
    for server, _ in nodes.values():
        wait_https_ready(server, context)
    return nodes


def peers_up(server: Server, context: ssl.SSLContext) -> dict[str, str]:
    status = httpx.get(https(server, "/v1/status"), verify=context, timeout=5).json()
    return {peer: s["state"] for peer, s in status["sync"]["peers"].items()}


def metric(server: Server, context: ssl.SSLContext, sample: str) -> float:
    text = httpx.get(https(server, "/metrics"), verify=context, timeout=5).text
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_three_regions_sync_over_mutual_tls_and_reload_certificates(
    serve: ServerFactory, pki: Pki
) -> None:
    secret = secrets.token_urlsafe(32)
    nodes = start_mesh(serve, pki, secret)
    context = pki.client_context()
    servers = {region: server for region, (server, _) in nodes.items()}
    for server in servers.values():
        eventually(lambda s=server: set(peers_up(s, context).values()) == {"up"}, "peers up")

    # a grant in one region is seen in the others, over https with client certificates
    us, eu, ap = (servers[r] for r in REGIONS)
    key = "agent-api-key-tls-1"
    granted = httpx.post(
        https(us, "/v1/rate"), headers={"X-API-Key": "tls-1"}, json={"tokens": 7}, verify=context
    )
    assert granted.status_code == 200, granted.text

    def replicated(server: Server) -> bool:
        state = httpx.get(https(server, "/v1/bucket/state"), params={"key": key}, verify=context)
        return (
            state.status_code == 200
            and sum(e["used"] for e in state.json()["replicas"].values()) == 7
        )

    for server in (eu, ap):
        eventually(lambda s=server: replicated(s), f"the grant reached {server.name}")

    # region pinning: a certificate the CA signed, but naming no region, cannot sync
    stranger = pki.client_context(pki.leaf("stranger", "mallory"))
    pinned = httpx.post(https(us, "/v1/sync/deltas"), content=b"x", verify=stranger)
    assert pinned.status_code == 403, pinned.text
    assert refused(us, context, "server", "wrong_region") == 1

    # ... and a region's certificate speaks for that region only: eu-west-1's own
    # certificate cannot carry a message that says it comes from ap-south-1
    eu_cert = pki.client_context(nodes["eu-west-1"][1])
    forged = sync.SyncAuth(CLUSTER_ID, secret).seal(
        sync.DELTAS,
        sync.encode_push(time.time_ns(), False, "ap-south-1/node-a/1", [], {}),  # a heartbeat
        sender="ap-south-1/node-a/1",
        region="ap-south-1",
        now_ns=time.time_ns(),
        nonce=os.urandom(sync.NONCE_BYTES),
    )
    posing = httpx.post(https(us, "/v1/sync/deltas"), content=forged, verify=eu_cert)
    assert posing.status_code == 403, posing.text
    assert "does not name region 'ap-south-1'" in posing.json()["detail"]
    assert refused(us, context, "server", "wrong_region") == 2

    # ap-south-1's certificate expires: its files are replaced, it serves the expired
    # one from the next handshake on, and its peers refuse it (counted as clients)
    ap_cert = nodes["ap-south-1"][1]
    pki.leaf("ap-south-1", "ap-south-1", *HOSTS, expired=True)
    eventually(
        lambda: refused(us, context, "client", "expired") >= 1,
        "us-east-1 refuses ap-south-1's expired certificate",
        timeout=30,
    )
    eventually(lambda: peers_up(us, context)["ap-south-1"] != "up", "ap-south-1 seen down from us")
    # renewed: served again without a restart, and the mesh heals
    pki.leaf("ap-south-1", "ap-south-1", *HOSTS)
    assert ap_cert == nodes["ap-south-1"][1]
    for server in servers.values():
        eventually(
            lambda s=server: set(peers_up(s, context).values()) == {"up"},
            f"{server.name} sees every peer up again",
        )
    assert metric(ap, context, "bucketmesh_tls_reloads_total") >= 2
    for server in servers.values():
        assert server.alive()
        assert (
            metric(server, context, 'bucketmesh_sync_rejected_total{reason="bad_signature"}') == 0
        )


def test_the_envoy_grpc_service_serves_tls_and_requires_client_certificates(
    serve: ServerFactory, pki: Pki
) -> None:
    import grpc

    from bucketmesh.integrations.proto import rls_pb2, rls_pb2_grpc

    cert = pki.leaf("node", *HOSTS)
    client = pki.leaf("envoy", "envoy")
    envoy_port = free_port()
    rules = [{"name": "api", "key": "api-{{ .Request.Query.a }}", "capacity": 5, "refillRate": 1}]
    config = make_config(
        rules,
        envoyListen=f"127.0.0.1:{envoy_port}",
        tls={"certFile": cert[0], "keyFile": cert[1], "caFile": pki.ca_file, "clientAuth": "all"},
    )
    server = serve(config, wait_ready=False)
    wait_https_ready(server, pki.client_context(client))
    request = rls_pb2.RateLimitRequest(
        domain="api",
        descriptors=[
            rls_pb2.RateLimitDescriptor(
                entries=[rls_pb2.RateLimitDescriptor.Entry(key="user", value="u1")]
            )
        ],
    )
    ca = Path(pki.ca_file).read_bytes()

    def call(credentials: grpc.ChannelCredentials | None) -> Any:
        target = f"127.0.0.1:{envoy_port}"
        channel = (
            grpc.secure_channel(target, credentials)
            if credentials is not None
            else grpc.insecure_channel(target)
        )
        with channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            return stub.ShouldRateLimit(request, timeout=5)

    mutual = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=Path(client[1]).read_bytes(),
        certificate_chain=Path(client[0]).read_bytes(),
    )
    assert call(mutual).overall_code == rls_pb2.RateLimitResponse.OK
    for refused_credentials in (None, grpc.ssl_channel_credentials(root_certificates=ca)):
        with pytest.raises(grpc.RpcError) as failed:
            call(refused_credentials)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

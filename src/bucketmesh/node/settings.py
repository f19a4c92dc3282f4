"""What one node needs to run, built from the config file, flags and environment
(``cli.py``) and handed to ``serve.Node``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bucketmesh.core.rules import Rule
from bucketmesh.http.server import ServerLimits
from bucketmesh.http.tls import TlsContexts
from bucketmesh.replication.discovery import DiscoverySettings
from bucketmesh.replication.mesh import MeshSettings
from bucketmesh.storage import REDIS_CALLS_IN_FLIGHT


@dataclass
class NodeSettings:
    """What one node needs to run; built from the config file, flags and env."""

    region: str
    node: str
    host: str
    port: int
    rules: Sequence[Rule]
    # defaultStateKey: the key template a GET /v1/bucket/state without ?key= reads
    default_state_key: str | None = None
    cluster_id: str = ""
    admin_token: str | None = None
    snapshot: str | None = None
    snapshot_interval_s: float = 5.0
    durability: str = "relaxed"
    max_buckets: int = 1_000_000
    limits: ServerLimits = field(default_factory=ServerLimits)
    version: str = "0"
    regions: int = 1
    sync: MeshSettings | None = None
    # storage.backend: redis (storage/redis_backend.py); the snapshot file is not used then
    storage: str = "memory"
    redis_url: str = "redis://localhost:6379/0"
    redis_timeout_s: float = 0.1
    redis_connections: int = 4
    # storage.redisCallsInFlight: decision script calls in flight per node
    redis_calls_in_flight: int = REDIS_CALLS_IN_FLIGHT
    # envoyListen: the Envoy rate limit service's gRPC (host, port); off when None
    envoy_listen: tuple[str, int] | None = None
    # adminListen: the reserved listener's (host, port), sync and admin only; off when None
    admin_listen: tuple[str, int] | None = None
    # tls: the listener's and the sync client's contexts (http/tls.py); off when None
    tls: TlsContexts | None = None
    # every admin token accepted (rotation); admin_token is the first
    admin_tokens: tuple[str, ...] = ()
    # files read again on change (node/reload.py): sync.secretFile, admin.tokenFile
    sync_secret_file: str | None = None
    admin_token_file: str | None = None
    # sync.discovery: this region's other nodes from a headless Service's DNS
    discovery: DiscoverySettings | None = None
    # the regions and slots sync.peers lists (discovery never touches them)
    static_peers: tuple[str, ...] = ()
    # affinity.forward: keys another node of the region owns go to it (api/forward.py)
    forward: bool = False
    forward_timeout_s: float = 0.2
    # near_limit: a grant leaving less than this share of capacity is counted as such
    near_limit: float = 0.2
    # audit: the trail's file (- for stdout); off when None (telemetry/audit.py)
    audit_path: str | None = None
    audit_sample: float = 1.0
    audit_hash_keys: bool = False
    audit_buffer: int = 10_000
    audit_max_bytes: int = 64 * 1024 * 1024
    audit_backups: int = 5

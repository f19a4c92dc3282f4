"""From a config file to a node's settings: the overrides of the environment and the
flags, the TLS contexts, the mesh's and the node's settings. One place, used by the
command line (``serve``, ``run``) and by embedded members (``bucketmesh.embed``), so
both build a node from a config the same way; it loads nothing of the tooling."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bucketmesh import __version__
from bucketmesh.node.config import (
    ENV_OVERRIDES,
    Config,
    ConfigError,
    apply_overrides,
    env_overrides,
    load_config,
    parse_listen,
)

FLAG_OVERRIDES = {
    "listen": "listen",
    "region": "region",
    "node": "node",
    "admin_token": "admin.token",
    "snapshot": "storage.snapshot",
    "durability": "storage.durability",
    "max_buckets": "limits.max_buckets",
}
#: The flag each override above comes from, for error messages.
FLAG_NAMES = {key: "--" + name.replace("_", "-") for name, key in FLAG_OVERRIDES.items()}
if TYPE_CHECKING:
    from bucketmesh.http.tls import TlsContexts
    from bucketmesh.node.serve import NodeSettings
    from bucketmesh.replication.discovery import DiscoverySettings
    from bucketmesh.replication.mesh import MeshSettings


def tls_contexts(config: Config) -> TlsContexts | None:
    """The node's TLS contexts, the certificate files loaded; a ConfigError naming
    the file and field when they cannot be."""
    from bucketmesh.http.tls import TlsContexts, TlsError, TlsFiles

    tls = config.tls
    if not tls.enabled:
        return None
    try:
        return TlsContexts(
            TlsFiles(
                cert_file=tls.cert_file,
                key_file=tls.key_file,
                ca_file=tls.ca_file,
                client_auth=tls.client_auth,
                pin_regions=tls.pin_regions,
                max_connection_age_s=tls.max_connection_age_ms / 1000,
            )
        )
    except TlsError as error:
        raise ConfigError(config.path or "<config>", error.field, error.message) from None


def mesh_settings(config: Config, tls: TlsContexts | None = None) -> MeshSettings | None:
    from bucketmesh.replication.mesh import MeshSettings

    if not config.sync.enabled:
        return None
    return MeshSettings(
        region=config.region,
        cluster_id=config.sync.sync_cluster_id,
        peers=config.remote_peers,
        secret=config.sync.secret,
        interval_s=config.sync.interval_ms / 1000,
        peer_timeout_s=config.sync.peer_timeout_ms / 1000,
        max_message_bytes=config.limits.max_body_bytes,
        unrecovered_start=config.sync.unrecovered_start,
        unrecovered_wait_s=config.sync.unrecovered_wait_ms / 1000,
        tls=tls,
    )


def discovery_settings(config: Config) -> DiscoverySettings | None:
    from bucketmesh.replication.discovery import DiscoverySettings

    discovery = config.sync.discovery
    if not config.sync.enabled or discovery is None:
        return None
    return DiscoverySettings(
        dns=discovery.dns,
        port_name=discovery.port_name,
        interval_s=discovery.interval_ms / 1000,
        resolver=parse_listen(discovery.resolver) if discovery.resolver else None,
        scheme=discovery.scheme,
    )


def node_settings(config: Config) -> NodeSettings:
    from bucketmesh.http.server import ServerLimits
    from bucketmesh.node.serve import NodeSettings

    tls = tls_contexts(config)
    return NodeSettings(
        region=config.region,
        node=config.node,
        host=config.listen_host,
        port=config.listen_port,
        rules=config.buckets,
        default_state_key=config.default_state_key,
        cluster_id=config.sync.sync_cluster_id,
        admin_token=config.admin.tokens[0] if config.admin.tokens else None,
        admin_tokens=config.admin.tokens,
        admin_token_file=config.admin.token_file,
        sync_secret_file=config.sync.secret_file if config.sync.enabled else None,
        tls=tls,
        snapshot=config.storage.snapshot,
        snapshot_interval_s=config.storage.snapshot_interval_ms / 1000,
        durability=config.storage.durability,
        max_buckets=config.limits.max_buckets,
        limits=ServerLimits(
            max_body_bytes=config.limits.max_body_bytes,
            max_header_bytes=config.limits.max_header_bytes,
            max_in_flight=config.limits.max_in_flight,
            shed_lag=config.limits.shed_lag_ms / 1000,
            header_timeout=config.limits.header_timeout_ms / 1000,
            body_timeout=config.limits.body_timeout_ms / 1000,
            keepalive_timeout=config.limits.keepalive_timeout_ms / 1000,
        ),
        version=__version__,
        regions=len(config.regions),
        sync=mesh_settings(config, tls),
        storage=config.storage.backend,
        redis_url=config.storage.redis_url,
        redis_timeout_s=config.storage.redis_timeout_ms / 1000,
        redis_calls_in_flight=config.storage.redis_calls_in_flight,
        envoy_listen=parse_listen(config.envoy_listen) if config.envoy_listen else None,
        admin_listen=parse_listen(config.admin_listen) if config.admin_listen else None,
        discovery=discovery_settings(config),
        forward=config.affinity.forward,
        forward_timeout_s=config.affinity.forward_timeout_ms / 1000,
        static_peers=config.sync.peers if config.sync.enabled else (),
        near_limit=config.near_limit,
        audit_path=config.audit.path if config.audit.enabled else None,
        audit_sample=config.audit.sample,
        audit_hash_keys=config.audit.hash_keys,
        audit_buffer=config.audit.buffer,
        audit_max_bytes=config.audit.max_bytes,
        audit_backups=config.audit.backups,
    )


def load(path: str, flags: dict[str, str], *, insecure_sync: bool = False) -> Config:
    """The config of ``path`` with env and flag overrides applied, then completed: what
    an enabled mesh needs (its secret, peer URLs) may come from any of them, and the
    environment beats the file. ``insecure_sync`` accepts an enabled mesh without a
    secret; everything else is checked."""
    overrides = env_overrides(os.environ)
    origin = {key: var for var, key in ENV_OVERRIDES.items() if var in os.environ}
    overrides.update(flags)
    origin.update({key: FLAG_NAMES.get(key, f"override {key}") for key in flags})
    config = load_config(path, complete=False)
    return apply_overrides(config, overrides, origin=origin, require_secret=not insecure_sync)

"""The ``bucketmesh`` command: ``serve``, ``run`` (the quick start), ``cluster`` and ``demo``.

Configuration precedence for ``serve``: the YAML file, then ``BUCKETMESH_*``
environment variables, then flags. A config error names file and field and
exits with status 2 before anything listens. Sync needs ``sync.secret``; only
``--insecure-sync`` lets a node sync without one (unsigned messages).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import yaml

from bucketmesh import __version__
from bucketmesh.node.config import (
    Config,
    ConfigError,
    apply_overrides,
    env_overrides,
    load_config,
    parse_config,
    parse_listen,
)
from bucketmesh.storage.wal import DURABILITIES

FLAG_OVERRIDES = {
    "listen": "listen",
    "region": "region",
    "node": "node",
    "admin_token": "admin.token",
    "snapshot": "storage.snapshot",
    "durability": "storage.durability",
    "max_buckets": "limits.max_buckets",
}
#: The config ``run --single`` serves: package data (src/bucketmesh/examples/), so it
#: is there in a wheel too; examples/ at the top of a checkout links to it.
EXAMPLE_CONFIG = resources.files("bucketmesh") / "examples" / "bucketmesh.yaml"


if TYPE_CHECKING:
    from bucketmesh.node.serve import Node, NodeSettings
    from bucketmesh.replication.mesh import MeshSettings


def _mesh_settings(config: Config) -> MeshSettings | None:
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
    )


def _settings(config: Config) -> NodeSettings:
    from bucketmesh.http.server import ServerLimits
    from bucketmesh.node.serve import NodeSettings

    return NodeSettings(
        region=config.region,
        node=config.node,
        host=config.listen_host,
        port=config.listen_port,
        rules=config.buckets,
        cluster_id=config.sync.sync_cluster_id if config.sync.enabled else "",
        admin_token=config.admin.token,
        snapshot=config.storage.snapshot,
        snapshot_interval_s=config.storage.snapshot_interval_ms / 1000,
        durability=config.storage.durability,
        max_buckets=config.limits.max_buckets,
        limits=ServerLimits(
            max_body_bytes=config.limits.max_body_bytes,
            max_header_bytes=config.limits.max_header_bytes,
        ),
        version=__version__,
        regions=len(config.regions),
        sync=_mesh_settings(config),
        storage=config.storage.backend,
        redis_url=config.storage.redis_url,
        redis_timeout_s=config.storage.redis_timeout_ms / 1000,
        envoy_listen=parse_listen(config.envoy_listen) if config.envoy_listen else None,
    )


def load(path: str, flags: dict[str, str], *, insecure_sync: bool = False) -> Config:
    """The config of ``path`` with env and flag overrides applied. ``insecure_sync``
    accepts an enabled mesh without ``sync.secret``; everything else is checked."""
    overrides = env_overrides(os.environ)
    overrides.update(flags)
    try:
        config = load_config(path)
        return apply_overrides(config, overrides) if overrides else config
    except ConfigError as error:
        if not (insecure_sync and error.field == "sync.secret"):
            raise
    # Load with sync off, which skips the secret check, then switch it back on and
    # check what the skipped validation would also have checked: the peer URLs.
    config = apply_overrides(_parse_with_sync_off(path), {**overrides, "sync.enabled": "false"})
    config = msgspec.structs.replace(
        config, sync=msgspec.structs.replace(config.sync, enabled=True, secret=None)
    )
    for region in config.sync.peers:
        if region != config.region and config.sync.url_for(region) is None:
            raise ConfigError(
                config.path or path,
                "sync.peerUrls",
                f"has no URL for region {region!r}, which sync.peers lists",
            )
    return config


def _parse_with_sync_off(path: str) -> Config:
    document = yaml.safe_load(Path(path).read_text())
    if not isinstance(document, dict):
        raise ConfigError(path, "", "expected a mapping of settings")
    sync = document.get("sync")
    document["sync"] = {**(sync if isinstance(sync, dict) else {}), "enabled": False}
    config = parse_config(yaml.safe_dump(document), file=path, base_dir=os.path.dirname(path))
    return msgspec.structs.replace(config, path=path)


def _quick_start_text(config: Config, port: int) -> str:
    """What ``run --single`` prints once it listens; ``port`` is the one it got (the
    config's, or the free one the kernel chose for port 0)."""
    base = f"http://{config.listen_host}:{port}"
    if config.listen_host in ("0.0.0.0", "::", ""):
        base = f"http://127.0.0.1:{port}"
    json_post = "-H 'Content-Type: application/json'"
    return f"""
bucketmesh {__version__} serving region {config.region} on {base} ({len(config.buckets)} rules)
Try:
  # consume one token from the seed bucket (capacity 5000, 50/s)
  curl -s -X POST {base}/v1/rate -H 'X-API-Key: my-agent-key' {json_post} -d '{{"tokens":1}}'
  # a small bucket (5 tokens, 1/s): the sixth call in a row gets 429 with Retry-After
  for i in 1 2 3 4 5 6; do
    curl -s -o /dev/null -w '%{{http_code}} ' '{base}/v1/rate?user=alice'; done; echo
  # raise its capacity at runtime for every key of the rule 'small' (the level is kept:
  # raising capacity never refills for free; it refills at 1/s up to 50 from now on)
  curl -s -X PATCH {base}/v1/buckets/small {json_post} -d '{{"capacity":50}}'
  curl -s '{base}/v1/bucket/state?key=small-alice'
Also: {base}/v1/status  {base}/metrics  {base}/openapi.json   (Ctrl-C stops)
"""


def cmd_serve(args: argparse.Namespace) -> int:
    from bucketmesh.node.serve import run_node

    flags = {
        FLAG_OVERRIDES[name]: str(value)
        for name, value in vars(args).items()
        if name in FLAG_OVERRIDES and value is not None
    }
    insecure = bool(getattr(args, "insecure_sync", False))
    try:
        config = load(args.config, flags, insecure_sync=insecure)
    except ConfigError as error:
        print(f"bucketmesh: config error: {error}", file=sys.stderr)
        if error.field == "sync.secret":
            print(
                "bucketmesh: set sync.secret (e.g. secret: ${BUCKETMESH_SYNC_SECRET}), or pass "
                "--insecure-sync to sync unsigned on a trusted network",
                file=sys.stderr,
            )
        return 2
    if config.sync.enabled and config.sync.secret is None:
        print(
            "bucketmesh: WARNING: --insecure-sync: sync messages are neither signed nor "
            "verified; anyone who can reach this port can change bucket state",
            file=sys.stderr,
        )
    settings = _settings(config)
    if args.quick_start:

        def on_ready(node: Node) -> None:
            print(_quick_start_text(config, node.server.port), flush=True)
    else:

        def on_ready(node: Node) -> None:
            print(
                f"bucketmesh: region {config.region} listening on "
                f"{config.listen_host}:{node.server.port}",
                flush=True,
            )

    try:
        run_node(settings, on_ready)
    except OSError as error:
        if error.strerror is None:  # the Envoy gRPC port (envoy_rls.py): the message says
            print(f"bucketmesh: {error}", file=sys.stderr)
        else:
            print(
                f"bucketmesh: cannot listen on {config.listen}: {error.strerror}", file=sys.stderr
            )
        return 1
    return 0


def cmd_demo(_args: argparse.Namespace) -> int:
    from bucketmesh.tooling.demo import demonstrate

    demonstrate()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The quick start: a three-region mesh on loopback (``cluster up``), or with
    ``--single`` (or ``--config``) one node serving the example config. Its
    snapshot (``./data/state.snap``) is relative to the working directory."""
    if args.config:
        args.quick_start = True
        return cmd_serve(args)
    if args.single:
        args.quick_start = True
        with resources.as_file(EXAMPLE_CONFIG) as path:
            args.config = str(path)
            return cmd_serve(args)
    return cmd_cluster_up(args)


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from bucketmesh.tooling.cluster import up
    from bucketmesh.tooling.netproxy import Faults

    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    faults = None
    if args.latency_ms or args.jitter_ms or args.loss or args.proxy:
        try:
            faults = Faults(args.latency_ms / 1000, args.jitter_ms / 1000, args.loss)
        except ValueError as error:
            print(f"bucketmesh cluster: {error}", file=sys.stderr)
            return 2
    return up(
        regions,
        base_port=args.base_port,
        buckets=args.buckets,
        faults=faults,
        admin_token=getattr(args, "admin_token", None) or os.environ.get("BUCKETMESH_ADMIN_TOKEN"),
    )


def _fraction(text: str) -> float:
    """A loss rate: ``0.01`` or ``1%``."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction or percentage: {text!r}") from None


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    from bucketmesh.tooling.cluster import DEFAULT_BASE_PORT, DEFAULT_REGIONS

    p.add_argument(
        "--regions",
        default=",".join(DEFAULT_REGIONS),
        help="comma-separated region names (default: %(default)s)",
    )
    p.add_argument(
        "--base-port",
        dest="base_port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help="port of the first region; the others follow; 0: free ports the kernel "
        "chooses, printed once ready (default: %(default)s)",
    )
    p.add_argument("--buckets", help="buckets.yaml with the rules (default: the example's)")
    faults = p.add_argument_group(
        "injected network faults",
        "with any of these, sync traffic between every pair of regions goes through a TCP "
        "proxy (bucketmesh.tooling.netproxy) that delays, jitters and loses it",
    )
    faults.add_argument(
        "--latency-ms", dest="latency_ms", type=float, default=0.0, help="one-way delay"
    )
    faults.add_argument(
        "--jitter-ms", dest="jitter_ms", type=float, default=0.0, help="± uniform jitter"
    )
    faults.add_argument(
        "--loss",
        type=_fraction,
        default=0.0,
        help="segment loss rate (0.01 or 1%%): a lost segment costs a TCP retransmission "
        "timeout (max(200 ms, one RTT)), as on a real network",
    )
    faults.add_argument(
        "--proxy", action="store_true", help="proxies between regions even without faults"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bucketmesh", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"bucketmesh {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("serve", cmd_serve, "run one node of the Rating API"),
        ("run", cmd_run, "quick start: a 3-region mesh on loopback (--single: one node)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", required=name == "serve", help="bucketmesh.yaml")
        p.add_argument(
            "--listen",
            help=("with --single: " if name == "run" else "")
            + "host:port (overrides the file); port 0: a free port, printed once ready",
        )
        p.add_argument("--region")
        p.add_argument("--node")
        p.add_argument("--admin-token", dest="admin_token")
        p.add_argument("--snapshot", help="snapshot file of the embedded store")
        p.add_argument(
            "--durability",
            choices=DURABILITIES,
            help="write-ahead log: relaxed survives kill -9, strict also power loss",
        )
        p.add_argument("--max-buckets", dest="max_buckets", type=int)
        p.add_argument(
            "--insecure-sync",
            dest="insecure_sync",
            action="store_true",
            help="allow sync without sync.secret: messages unsigned and unverified",
        )
        p.add_argument("--quick-start", action="store_true", help=argparse.SUPPRESS)
        if name == "run":
            p.add_argument(
                "--single",
                action="store_true",
                help="one node serving the example config, bucketmesh/examples/bucketmesh.yaml "
                "in the package (implied by --config)",
            )
            _cluster_flags(p)
        p.set_defaults(func=func)
    cluster = sub.add_parser("cluster", help="a whole mesh on this machine")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    cluster_up = cluster_sub.add_parser(
        "up", help="one `bucketmesh serve` per region on loopback, with a generated secret"
    )
    _cluster_flags(cluster_up)
    cluster_up.add_argument(
        "--admin-token",
        dest="admin_token",
        help="every node's admin token (PATCH, fault injection); default $BUCKETMESH_ADMIN_TOKEN",
    )
    cluster_up.set_defaults(func=cmd_cluster_up)
    from bucketmesh.tooling.xr.cli import add_parser as add_xr_parser

    add_xr_parser(sub)
    demo = sub.add_parser("demo", help="in-process: three replicas of one bucket converging")
    demo.set_defaults(func=cmd_demo)
    from bucketmesh.tooling import sim

    simulate = sub.add_parser(
        "sim", help="the deterministic simulator", description=sim.DESCRIPTION
    )
    sim.add_arguments(simulate)
    simulate.set_defaults(func=sim.run_schedules)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""The ``bucketmesh`` command: ``serve``, ``run`` (the quick start) and ``demo``.

Configuration precedence for ``serve``: the YAML file, then ``BUCKETMESH_*``
environment variables, then flags. A config error names file and field and
exits with status 2 before anything listens.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bucketmesh import __version__
from bucketmesh.config import Config, ConfigError, apply_overrides, env_overrides, load_config

FLAG_OVERRIDES = {
    "listen": "listen",
    "region": "region",
    "node": "node",
    "admin_token": "admin.token",
    "snapshot": "storage.snapshot",
    "max_buckets": "limits.max_buckets",
}
EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "bucketmesh.yaml"


def _settings(config: Config) -> object:
    from bucketmesh.http11 import ServerLimits
    from bucketmesh.serve import NodeSettings

    return NodeSettings(
        region=config.region,
        node=config.node,
        host=config.listen_host,
        port=config.listen_port,
        rules=config.buckets,
        cluster_id=config.sync.sync_cluster_id if config.sync.enabled else "",
        admin_token=config.admin.token,
        snapshot=config.storage.snapshot,
        max_buckets=config.limits.max_buckets,
        limits=ServerLimits(
            max_body_bytes=config.limits.max_body_bytes,
            max_header_bytes=config.limits.max_header_bytes,
        ),
        version=__version__,
    )


def load(path: str, flags: dict[str, str]) -> Config:
    config = load_config(path)
    overrides = env_overrides(os.environ)
    overrides.update(flags)
    return apply_overrides(config, overrides) if overrides else config


def _quick_start_text(config: Config) -> str:
    base = f"http://{config.listen_host}:{config.listen_port}"
    if config.listen_host in ("0.0.0.0", "::", ""):
        base = f"http://127.0.0.1:{config.listen_port}"
    return f"""
bucketmesh {__version__} serving region {config.region} on {base} ({len(config.buckets)} rules)
Try:
  # consume one token from the seed bucket (capacity 5000, 50/s)
  curl -s -X POST {base}/v1/rate -H 'X-API-Key: my-agent-key' -H 'Content-Type: application/json' -d '{{"tokens":1}}'
  # a small bucket (5 tokens, 1/s): the sixth call in a row gets 429 with Retry-After
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' '{base}/v1/rate?user=alice'; done; echo
  # raise its capacity at runtime for every key of the rule 'small' (the level is kept:
  # raising capacity never refills for free; it refills at 1/s up to 50 from now on)
  curl -s -X PATCH {base}/v1/buckets/small -H 'Content-Type: application/json' -d '{{"capacity":50}}'
  curl -s '{base}/v1/bucket/state?key=small-alice'
Also: {base}/v1/status  {base}/metrics  {base}/openapi.json   (Ctrl-C stops)
"""


def cmd_serve(args: argparse.Namespace) -> int:
    from bucketmesh.serve import run_node

    flags = {FLAG_OVERRIDES[name]: str(value) for name, value in vars(args).items()
             if name in FLAG_OVERRIDES and value is not None}
    try:
        config = load(args.config, flags)
    except ConfigError as error:
        print(f"bucketmesh: config error: {error}", file=sys.stderr)
        return 2
    settings = _settings(config)
    if args.quick_start:
        text = _quick_start_text(config)

        def on_ready(_node: object) -> None:
            print(text, flush=True)
    else:
        def on_ready(_node: object) -> None:
            print(f"bucketmesh: region {config.region} listening on "
                  f"{config.listen_host}:{config.listen_port}", flush=True)
    try:
        run_node(settings, on_ready)  # type: ignore[arg-type]
    except OSError as error:
        print(f"bucketmesh: cannot listen on {config.listen}: {error.strerror}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(_args: argparse.Namespace) -> int:
    from bucketmesh.demo import demonstrate

    demonstrate()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The quick start: a single-region node on the embedded store, with the seed rules."""
    args.config = args.config or str(EXAMPLE_CONFIG)
    args.quick_start = True
    return cmd_serve(args)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bucketmesh", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"bucketmesh {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("serve", cmd_serve, "run one node of the Rating API"),
        ("run", cmd_run, "quick start: serve examples/bucketmesh.yaml and print what to try"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", required=name == "serve", help="bucketmesh.yaml")
        p.add_argument("--listen", help="host:port (overrides the file)")
        p.add_argument("--region")
        p.add_argument("--node")
        p.add_argument("--admin-token", dest="admin_token")
        p.add_argument("--snapshot", help="snapshot file of the embedded store")
        p.add_argument("--max-buckets", dest="max_buckets", type=int)
        p.add_argument("--quick-start", action="store_true", help=argparse.SUPPRESS)
        p.set_defaults(func=func)
    demo = sub.add_parser("demo", help="in-process: three replicas of one bucket converging")
    demo.set_defaults(func=cmd_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

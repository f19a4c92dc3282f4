"""The ``bucketmesh`` command: ``serve``, ``run`` (the quick start), and the subcommands
of the client, the tooling and the operator (each dispatched to its package).

Configuration precedence for ``serve``: the YAML file, then ``BUCKETMESH_*``
environment variables, then flags. A config error names file and field and
exits with status 2 before anything listens. Sync needs ``sync.secret``; only
``--insecure-sync`` lets a node sync without one (unsigned messages).

Every command checks its arguments before it does anything: a bad value exits
with status 2 and a message naming the argument (argparse's ``error``, or a
config error naming the flag, variable or file), never with a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from bucketmesh import __version__
from bucketmesh.node.assemble import FLAG_NAMES, FLAG_OVERRIDES, load, node_settings
from bucketmesh.node.config import (
    Config,
    ConfigError,
    load_buckets,
)
from bucketmesh.storage.wal import DURABILITIES
from bucketmesh.telemetry.log import configure as configure_logging
from bucketmesh.telemetry.log import logger

#: The config ``run --single`` serves: package data (src/bucketmesh/examples/), so it
#: is there in a wheel too; examples/ at the top of a checkout links to it.
EXAMPLE_CONFIG = resources.files("bucketmesh") / "examples" / "bucketmesh.yaml"
#: Room the state files beside a snapshot need in a file name: ``.<name>.tmp-XXXXXXXX``
#: (a snapshot being written), ``<name>.wal.<seq>`` (log segments), ``<name>.lock``.
STATE_NAME_ROOM = 26
#: Bounds of ``bucketmesh sim``'s flags: more replicas than this make a schedule
#: quadratic for nothing (the default is 2-5), and a run of more schedules or
#: events than these would not end in a working day.
SIM_MAX_REPLICAS = 64
SIM_MAX_EVENTS = 1_000_000
SIM_MAX_SEEDS = 10_000_000
#: ``--max-buckets`` ends where a count stops fitting the int64 the state and the
#: metrics carry (a million buckets take about 300 MB; this is "no cap").
MAX_BUCKETS_FLAG = 2**63 - 1
#: A local mesh runs one process per region: more than this is not a mesh to try on
#: one machine.
MAX_LOCAL_REGIONS = 16

log = logger("cli")

if TYPE_CHECKING:
    from bucketmesh.node.serve import Node


def _ops_config(path: str) -> Config:
    """A node's config as ``reconcile`` reads it (its mesh, cluster id and secret); a
    config error becomes a ValueError, which the tool reports and exits 2 on."""
    try:
        return load(path, {}, insecure_sync=True)
    except ConfigError as error:
        raise ValueError(str(error)) from None


#: Header names that carry credentials: a key built from one as it is puts the
#: credential in state, snapshots, sync messages, logs and metrics' key listings.
_CREDENTIAL_HEADER = re.compile(
    r"(?:.*[-_])?(?:api[-_]?key|token|secret|password)|authorization|proxy-authorization|cookie",
    re.IGNORECASE,
)


def credential_key_warnings(config: Config) -> list[str]:
    """A warning for each rule whose bucket key holds the raw value of a header
    named like a credential (``*-API-Key``, ``Authorization``, ...): the fix is
    ``| sha256`` in the placeholder (docs/security.md)."""
    warnings = []
    for rule in config.buckets:
        for header in rule.template.raw_header_names:
            if _CREDENTIAL_HEADER.fullmatch(header):
                warnings.append(
                    f"WARNING: rule {rule.name!r} builds its bucket keys from the raw value "
                    f"of header {header!r}, which looks like a credential: it would be kept "
                    "in bucket state and snapshots and sent to every region. Write "
                    f"{{{{ .Request.Header.{header} | sha256 }}}} in its key to keep a hash "
                    "instead (docs/security.md)"
                )
    return warnings


def _quick_start_text(config: Config, port: int) -> str:
    """What ``run --single`` prints once it listens; ``port`` is the one it got (the
    config's, or the free one the kernel chose for port 0)."""
    base = f"http://{config.listen_host}:{port}"
    if config.listen_host in ("0.0.0.0", "::", ""):
        base = f"http://127.0.0.1:{port}"
    json_post = "-H 'Content-Type: application/json'"
    state = config.storage.snapshot or "memory only (no snapshot)"
    return f"""
bucketmesh {__version__} serving region {config.region} on {base} ({len(config.buckets)} rules)
State: {state}
Try these four commands:
  # consume one token from the seed bucket (capacity 5000, 50/s)
  curl -s -X POST {base}/v1/rate -H 'X-API-Key: my-agent-key' {json_post} -d '{{"tokens":1}}'
  # a small bucket (5 tokens, 1/s): the sixth call in a row gets 429 with Retry-After
  for i in 1 2 3 4 5 6; do
    curl -s -o /dev/null -w '%{{http_code}} ' '{base}/v1/rate?user=alice'; done; echo
  # raise its capacity at runtime for every key of the rule 'small' (the level is kept:
  # raising capacity never refills for free; it refills at 1/s up to 50 from now on)
  curl -s -X PATCH {base}/v1/buckets/small {json_post} -d '{{"capacity":50}}'
  # read that bucket: its level, its new capacity, what each replica has spent
  curl -s '{base}/v1/bucket/state?key=small-alice'
Also: {base}/v1/status  {base}/metrics  {base}/openapi.json   (Ctrl-C stops)
"""


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Exit 2 with ``message`` and the usage of the command ``args`` came from."""
    error: Callable[[str], NoReturn] = args.usage_error
    error(message)


def _snapshot_problem(path: str) -> str | None:
    """Why a snapshot file (and the log, lock and temporary files beside it) cannot
    live at ``path``; None when it can. Checked before anything is opened, so a
    path that cannot exist is a usage error, not a failure to start. Makes the
    directory, as the store would a moment later: that is the test that it can."""
    target = Path(path)
    directory = target.parent
    if target.name in ("", ".", ".."):
        return f"must name a file, got {path!r}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        longest = os.pathconf(directory, "PC_NAME_MAX")
    except OSError as error:
        return f"cannot be created: directory {str(directory)!r}: {error.strerror or error}"
    except ValueError:  # no such limit on this system
        longest = 255
    length = len(os.fsencode(target.name))
    if length + STATE_NAME_ROOM > longest:
        return (
            f"has a file name too long for the log and lock files beside it "
            f"({length} bytes, at most {longest - STATE_NAME_ROOM})"
        )
    if target.exists() and not target.is_file():
        return f"must be a regular file, got {path!r}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot be created: directory {str(directory)!r} is not writable"
    return None


def _check_snapshot(config: Config, flags: dict[str, str], origin: str | None = None) -> None:
    """A ConfigError naming where the snapshot path came from, if it cannot work
    (``origin``: what chose a path given as the flag, e.g. ``BUCKETMESH_STATE_DIR``)."""
    path = config.storage.snapshot
    if path is None or config.storage.backend != "memory" or path.startswith("dynamodb://"):
        return  # (a dynamodb:// URI is checked by the config, its table at start-up)
    problem = _snapshot_problem(path)
    if problem is None:
        return
    if "storage.snapshot" in flags:
        where = origin or FLAG_NAMES["storage.snapshot"]
    elif "BUCKETMESH_STORAGE_SNAPSHOT" in os.environ:
        where = "BUCKETMESH_STORAGE_SNAPSHOT"
    else:
        where = config.path or "<config>"
    raise ConfigError(where, "storage.snapshot", problem)


def cmd_serve(args: argparse.Namespace) -> int:
    from bucketmesh.node.serve import StartError, run_node

    flags = {
        FLAG_OVERRIDES[name]: str(value)
        for name, value in vars(args).items()
        if name in FLAG_OVERRIDES and value is not None
    }
    insecure = bool(getattr(args, "insecure_sync", False))
    try:
        config = load(args.config, flags, insecure_sync=insecure)
        _check_snapshot(config, flags, getattr(args, "snapshot_origin", None))
    except ConfigError as error:
        log.error("config error: %s", error)
        if error.field == "sync.secret":
            log.error("or pass --insecure-sync to sync unsigned on a trusted network")
        return 2
    if config.sync.enabled and config.sync.secret is None:
        log.warning(
            "WARNING: --insecure-sync: sync messages are neither signed nor "
            "verified; anyone who can reach this port can change bucket state"
        )
    try:
        settings = node_settings(config)
    except ConfigError as error:
        log.error("config error: %s", error)
        return 2
    for warning in credential_key_warnings(config):
        log.warning("%s", warning)
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
        run_node(settings, on_ready, lifeline=args.lifeline_fd)
    except StartError as error:
        log.error("%s", error)
        return 1
    except OSError as error:  # a failure of the machine (disk, descriptors), not a bug
        log.error("stopped: %s", error)
        return 1
    return 0


def cmd_demo(_args: argparse.Namespace) -> int:
    from bucketmesh.tooling.demo import demonstrate

    demonstrate()
    return 0


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``run --single`` keeps its state: ``$BUCKETMESH_STATE_DIR``, else
    ``$XDG_STATE_HOME/bucketmesh``, else ``~/.local/state/bucketmesh`` — never the
    directory it happens to be started from."""
    env = os.environ if environ is None else environ
    if env.get("BUCKETMESH_STATE_DIR"):
        return Path(env["BUCKETMESH_STATE_DIR"])
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "bucketmesh"


def state_dir_origin(environ: Mapping[str, str] | None = None) -> str:
    """What chose ``state_dir()``, as an error about it names it."""
    env = os.environ if environ is None else environ
    if env.get("BUCKETMESH_STATE_DIR"):
        return "BUCKETMESH_STATE_DIR"
    if env.get("XDG_STATE_HOME"):
        return "XDG_STATE_HOME"
    return "run --single's state directory (~/.local/state/bucketmesh)"


def cmd_run(args: argparse.Namespace) -> int:
    """The quick start: a three-region mesh on loopback (``cluster up``), or with
    ``--single`` (or ``--config``) one node serving the example config. The
    example's snapshot goes to ``state_dir()`` unless ``--snapshot`` or
    ``BUCKETMESH_STORAGE_SNAPSHOT`` says where."""
    if args.config:
        args.quick_start = True
        return cmd_serve(args)
    if args.single:
        args.quick_start = True
        if args.snapshot is None and "BUCKETMESH_STORAGE_SNAPSHOT" not in os.environ:
            args.snapshot = str(state_dir() / "state.snap")
            args.snapshot_origin = state_dir_origin()
        with resources.as_file(EXAMPLE_CONFIG) as path:
            args.config = str(path)
            return cmd_serve(args)
    return cmd_cluster_up(args)


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from bucketmesh.tooling.cluster import MAX_ONE_WAY_DELAY_MS, up
    from bucketmesh.tooling.netproxy import Faults

    regions: list[str] = args.regions
    if args.base_port and args.base_port + len(regions) - 1 > 65535:
        _usage_error(
            args,
            f"argument --base-port: {args.base_port} leaves no room for {len(regions)} "
            f"regions (ports {args.base_port}-{args.base_port + len(regions) - 1}); "
            f"give at most {65536 - len(regions)}, or 0 for free ports",
        )
    if args.latency_ms + args.jitter_ms >= MAX_ONE_WAY_DELAY_MS:
        _usage_error(
            args,
            f"argument --latency-ms/--jitter-ms: {args.latency_ms:g} + {args.jitter_ms:g} ms "
            f"one way must stay below {MAX_ONE_WAY_DELAY_MS:g} ms (half the nodes' peer "
            "timeout), or every sync round trip would time out",
        )
    faults = None
    if args.latency_ms or args.jitter_ms or args.loss or args.proxy:
        faults = Faults(args.latency_ms / 1000, args.jitter_ms / 1000, args.loss)
    return up(
        regions,
        base_port=args.base_port,
        buckets=args.buckets,
        faults=faults,
        admin_token=getattr(args, "admin_token", None) or os.environ.get("BUCKETMESH_ADMIN_TOKEN"),
    )


def cmd_sim(args: argparse.Namespace) -> int:
    """``bucketmesh sim``, its integer flags (defined in ``tooling/sim.py``) checked first."""
    from bucketmesh.tooling import sim

    bounds = {
        "seeds": (1, SIM_MAX_SEEDS),
        "first": (0, None),
        "seed": (0, None),
        "replicas": (1, SIM_MAX_REPLICAS),
        "events": (1, SIM_MAX_EVENTS),
    }
    for name, (low, high) in bounds.items():
        value = getattr(args, name, None)
        if value is not None and (value < low or (high is not None and value > high)):
            limits = f"between {low} and {high}" if high is not None else f">= {low}"
            _usage_error(args, f"argument --{name}: must be {limits}, got {value}")
    return sim.run_schedules(args)


# -- argument types: each raises ArgumentTypeError, which argparse reports as
# -- "argument --flag: message" with exit status 2 --------------------------------------


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer type in ``[low, high]``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return convert


def _number(low: float, high: float) -> Callable[[str], float]:
    """A finite number in ``[low, high]``."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be a finite number from {low:g} to {high:g}, got {text}"
            )
        return value

    return convert


def _fraction(text: str) -> float:
    """A loss rate: ``0.01`` or ``1%``, in [0, 1)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction or percentage: {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(
            f"must be a fraction in [0, 1) such as 0.01 or 1%, got {text!r}"
        )
    return value


def _regions(text: str) -> list[str]:
    """Comma-separated region names, each valid as a region and a file name, distinct."""
    from bucketmesh.tooling.cluster import region_problem

    regions = [r.strip() for r in text.split(",") if r.strip()]
    if not regions:
        raise argparse.ArgumentTypeError(f"name at least one region, got {text!r}")
    if len(regions) > MAX_LOCAL_REGIONS:
        raise argparse.ArgumentTypeError(
            f"names {len(regions)} regions; a local mesh has at most {MAX_LOCAL_REGIONS}"
        )
    for region in regions:
        problem = region_problem(region)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
    if len(set(regions)) != len(regions):
        raise argparse.ArgumentTypeError(f"names a region twice: {text!r}")
    return regions


def _buckets_file(text: str) -> str:
    """A readable buckets.yaml whose rules are valid (the nodes would refuse it)."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no buckets file at {text!r}")
    try:
        load_buckets(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _lifeline(text: str) -> int:
    """An inherited descriptor of a pipe or socket (its end is the stop signal)."""
    fd = _integer(0)(text)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise argparse.ArgumentTypeError(f"{fd} is not an open file descriptor") from None
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        raise argparse.ArgumentTypeError(f"{fd} is not a pipe or a socket")
    return fd


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    from bucketmesh.tooling.cluster import DEFAULT_BASE_PORT, DEFAULT_REGIONS, MAX_ONE_WAY_DELAY_MS

    p.add_argument(
        "--regions",
        type=_regions,
        default=",".join(DEFAULT_REGIONS),
        help="comma-separated region names, 1-63 letters, digits, '.', '_' or '-' "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--base-port",
        dest="base_port",
        type=_integer(0, 65535),
        default=DEFAULT_BASE_PORT,
        help="port of the first region; the others follow; 0: free ports the kernel "
        "chooses, printed once ready (default: %(default)s)",
    )
    p.add_argument(
        "--buckets", type=_buckets_file, help="buckets.yaml with the rules (default: the example's)"
    )
    faults = p.add_argument_group(
        "injected network faults",
        "with any of these, sync traffic between every pair of regions goes through a TCP "
        "proxy (bucketmesh.tooling.netproxy) that delays, jitters and loses it; latency + "
        f"jitter must stay below {MAX_ONE_WAY_DELAY_MS:g} ms (half the nodes' peer timeout)",
    )
    delay = _number(0.0, MAX_ONE_WAY_DELAY_MS)
    faults.add_argument(
        "--latency-ms", dest="latency_ms", type=delay, default=0.0, help="one-way delay"
    )
    faults.add_argument(
        "--jitter-ms", dest="jitter_ms", type=delay, default=0.0, help="± uniform jitter"
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


SERVE_DESCRIPTION = """\
Run one node of the Rating API until it is told to stop.

Signals: SIGTERM, SIGINT and SIGHUP all stop the node gracefully: it stops
accepting, finishes the requests in flight, sends what the sync mesh still has
queued and writes a final snapshot, then exits 0. SIGHUP does not reload the
configuration: rules from a file have version 0, so an edited file would lose
to every runtime PATCH and change only new keys, differently per region;
restart the node to apply a new file, and change limits at runtime with
PATCH /v1/buckets/{key}, which replicates (docs/design.md, "The server").
"""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bucketmesh", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"bucketmesh {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("serve", cmd_serve, "run one node of the Rating API"),
        ("run", cmd_run, "quick start: a 3-region mesh on loopback (--single: one node)"),
    ):
        p = sub.add_parser(
            name,
            help=help_text,
            description=SERVE_DESCRIPTION if name == "serve" else help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", "-c", required=name == "serve", help="bucketmesh.yaml")
        p.add_argument(
            "--listen",
            help=("with --single: " if name == "run" else "")
            + "host:port (overrides the file); port 0: a free port, printed once ready",
        )
        p.add_argument("--region")
        p.add_argument("--node")
        p.add_argument("--admin-token", dest="admin_token")
        p.add_argument(
            "--snapshot",
            help="snapshot file of the embedded store (its directory is created if need be)",
        )
        p.add_argument(
            "--durability",
            choices=DURABILITIES,
            help="write-ahead log: relaxed survives kill -9, strict also power loss",
        )
        p.add_argument("--max-buckets", dest="max_buckets", type=_integer(1, MAX_BUCKETS_FLAG))
        p.add_argument(
            "--insecure-sync",
            dest="insecure_sync",
            action="store_true",
            help="allow sync without sync.secret: messages unsigned and unverified",
        )
        p.add_argument(
            "--lifeline-fd",
            dest="lifeline_fd",
            type=_lifeline,
            metavar="FD",
            help="an inherited pipe whose write end a supervisor holds: when it closes "
            "(the supervisor is gone, however it died) the node stops gracefully",
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
        p.set_defaults(func=func, usage_error=p.error)
    cluster = sub.add_parser("cluster", help="a whole mesh on this machine")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    cluster_up = cluster_sub.add_parser(
        "up",
        help="one `bucketmesh serve` per region on loopback, with a generated secret",
        description="One `bucketmesh serve` per region on loopback, with a generated "
        "secret. Ctrl-C, SIGTERM or SIGHUP stops every node gracefully; the nodes also "
        "stop if this process dies (even by kill -9), and their temporary directory goes "
        "with them.",
    )
    _cluster_flags(cluster_up)
    cluster_up.add_argument(
        "--admin-token",
        dest="admin_token",
        help="every node's admin token (PATCH, fault injection); default $BUCKETMESH_ADMIN_TOKEN",
    )
    cluster_up.set_defaults(func=cmd_cluster_up, usage_error=cluster_up.error)
    from bucketmesh.tooling.xr.cli import add_parser as add_xr_parser

    add_xr_parser(sub)
    from bucketmesh.client.cli import add_parsers as add_client_parsers

    add_client_parsers(sub)  # rate, state, configure: the client's operator commands
    from bucketmesh.autoscale.cli import add_parser as add_autoscale_parser

    add_autoscale_parser(sub)  # the controller beside the mesh (docs/autoscale.md)
    from bucketmesh.tooling.ops import add_parsers as add_ops_parsers

    add_ops_parsers(sub, _ops_config)  # reconcile, metrics export, audit duplicates
    demo = sub.add_parser("demo", help="in-process: three replicas of one bucket converging")
    demo.set_defaults(func=cmd_demo, usage_error=demo.error)
    from bucketmesh.tooling import sim

    simulate = sub.add_parser(
        "sim", help="the deterministic simulator", description=sim.DESCRIPTION
    )
    sim.add_arguments(simulate)
    simulate.set_defaults(func=cmd_sim, usage_error=simulate.error)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

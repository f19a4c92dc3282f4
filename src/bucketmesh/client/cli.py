"""``bucketmesh rate | state | configure``: the operator's command line, on ``Client``.

Each prints the answer as JSON on stdout. Exit status: 0 done (``rate``: allowed),
1 denied (``rate`` only), 2 a usage error or a request the server refused (the
message names the field), 3 no region answered. ``--url`` (repeatable, preference
order; ``region=URL`` names a region) defaults to ``$BUCKETMESH_URL``, else
``http://127.0.0.1:8080``; ``--admin-token`` to ``$BUCKETMESH_ADMIN_TOKEN``.

This module imports no HTTP library until a command runs, so ``bucketmesh serve``
does not pay for it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

#: the project's logger tree (bucketmesh.telemetry.log, which the client may not import)
log = logging.getLogger("bucketmesh.client")

if TYPE_CHECKING:
    from bucketmesh.client.sync import Client

EXIT_OK = 0
EXIT_DENIED = 1
EXIT_REFUSED = 2
EXIT_UNAVAILABLE = 3


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="a node's base URL, or region=URL; repeat for failover, the preferred first "
        "(default: $BUCKETMESH_URL, else http://127.0.0.1:8080)",
    )
    p.add_argument("--timeout", type=_seconds, default=1.0, help="seconds per attempt (default 1)")
    p.add_argument(
        "--retry-for",
        dest="retry_for",
        type=_seconds,
        default=5.0,
        help="seconds a call keeps retrying (default 5)",
    )


def add_parsers(sub: Any) -> None:
    """Add ``rate``, ``state`` and ``configure`` to the ``bucketmesh`` command."""
    rate = sub.add_parser(
        "rate",
        help="take tokens from a bucket (exit 0 allowed, 1 denied)",
        description="POST /v1/rate through the client: retried safely, with failover. "
        "Prints the decision; exit 0 allowed, 1 denied, 2 refused, 3 no region answered.",
    )
    rate.add_argument("key", help="the bucket key")
    rate.add_argument("--tokens", type=_positive_int, default=1)
    rate.add_argument(
        "--rule",
        help="the rule whose limits apply (when no template makes KEY; another rule than "
        "the one that owns KEY decides on its own bucket, KEY%%@RULE)",
    )
    rate.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="when denied, sleep retry_after and ask again, for up to SECONDS",
    )
    rate.add_argument(
        "--fail",
        choices=("raise", "open", "closed"),
        default="raise",
        help="when no region answers: exit 3 (raise, the default), allow (open) or deny (closed)",
    )
    _common(rate)
    rate.set_defaults(func=cmd_rate, usage_error=rate.error)

    state = sub.add_parser(
        "state",
        help="a bucket's replicated state",
        description="GET /v1/bucket/state through the client.",
    )
    state.add_argument("key", help="the bucket key")
    state.add_argument("--rule", help="the rule (for a key no template produces)")
    _common(state)
    state.set_defaults(func=cmd_state, usage_error=state.error)

    configure = sub.add_parser(
        "configure",
        help="change a rule's or a key's limits in every region (PATCH)",
        description="PATCH /v1/buckets/NAME through the client: NAME is a rule's name "
        "(every bucket of it) or one bucket key. Give at least one of the limits.",
    )
    configure.add_argument("name", help="a rule name or a bucket key")
    configure.add_argument("--capacity", type=_positive_int)
    configure.add_argument("--refill-rate", dest="refill_rate", type=_number, metavar="PER_S")
    configure.add_argument("--ttl", type=_number, metavar="SECONDS")
    configure.add_argument("--mode", choices=("shared", "strict", "local"))
    configure.add_argument(
        "--admin-token", dest="admin_token", help="default: $BUCKETMESH_ADMIN_TOKEN"
    )
    _common(configure)
    configure.set_defaults(func=cmd_configure, usage_error=configure.error)


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    error: Callable[[str], NoReturn] = args.usage_error
    error(message)


def _client(args: argparse.Namespace, **kwargs: Any) -> Client:
    from bucketmesh.client.retry import RetryPolicy
    from bucketmesh.client.sync import Client

    try:
        return Client(
            args.url,
            timeout=args.timeout,
            retry=RetryPolicy(total_timeout=args.retry_for),
            **kwargs,
        )
    except ValueError as error:
        _usage_error(args, str(error))


def _print(value: Any) -> None:
    import msgspec

    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n")


def _run(args: argparse.Namespace, call: Callable[[Client], Any]) -> int:
    from bucketmesh.client.errors import ApiError, Unavailable

    try:
        with _client(args, **getattr(args, "client_options", {})) as client:
            result = call(client)
    except ValueError as error:  # an argument the client refuses before sending it
        _usage_error(args, str(error))
    except ApiError as error:
        log.error("%s: %s", args.command, error)
        return EXIT_REFUSED
    except Unavailable as error:
        log.error("%s: %s", args.command, error)
        return EXIT_UNAVAILABLE
    _print(result)
    allowed = getattr(result, "allowed", True)
    return EXIT_OK if allowed else EXIT_DENIED


def cmd_rate(args: argparse.Namespace) -> int:
    args.client_options = {"on_unavailable": args.fail}
    return _run(
        args,
        lambda client: client.rate(
            args.key, args.tokens, args.rule, wait=args.wait is not None, timeout=args.wait
        ),
    )


def cmd_state(args: argparse.Namespace) -> int:
    return _run(args, lambda client: client.state(args.key, args.rule))


def cmd_configure(args: argparse.Namespace) -> int:
    limits = {
        "capacity": args.capacity,
        "refill_rate": args.refill_rate,
        "ttl": args.ttl,
        "mode": args.mode,
    }
    if all(value is None for value in limits.values()):
        _usage_error(args, "give at least one of --capacity, --refill-rate, --ttl, --mode")
    args.client_options = {"admin_token": args.admin_token}
    return _run(args, lambda client: client.configure(args.name, **limits))


__all__ = ["add_parsers", "cmd_configure", "cmd_rate", "cmd_state"]

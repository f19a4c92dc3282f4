"""``bucketmesh autoscale [run|explain] --config FILE``: the controller process and
the account of its last decisions."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from typing import Any

from bucketmesh.autoscale.policy import PolicyError, check_outputs, load
from bucketmesh.telemetry.log import logger

log = logger("autoscale")


def add_parser(sub: Any) -> None:
    """Add ``autoscale`` to the ``bucketmesh`` command."""
    autoscale = sub.add_parser(
        "autoscale",
        help="forecast demand and change limits ahead of it (a controller beside the mesh)",
        description="run: every interval read the signals, forecast them and change limits "
        "through PATCH (docs/autoscale.md). explain: print the last decisions and why.",
    )
    autoscale.add_argument("what", nargs="?", choices=("run", "explain"), default="run")
    autoscale.add_argument("--config", required=True, help="the controller's YAML config")
    autoscale.add_argument(
        "--dry-run", action="store_true", help="only report what it would change (run)"
    )
    autoscale.add_argument(
        "--ticks", type=_positive_int, help="stop after this many intervals (run; default: never)"
    )
    autoscale.add_argument(
        "--last", type=_positive_int, default=5, help="decisions per policy to print (explain)"
    )
    autoscale.set_defaults(func=cmd_autoscale, usage_error=autoscale.error)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def cmd_autoscale(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except PolicyError as error:
        log.error("autoscale: %s", error)
        return 2
    if args.what == "explain":
        return explain(config.decisions, config.file, args.last)
    try:
        check_outputs(config)
    except PolicyError as error:
        log.error("autoscale: %s", error)
        return 2
    from bucketmesh.autoscale.runner import Runner

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    runner = Runner(config, dry_run=args.dry_run or None, stop=stop)
    try:
        address = runner.serve_metrics()
    except OSError as error:
        log.error("autoscale: listen %s: %s", config.listen, error)
        runner.close()
        return 2
    if address is not None:
        log.info("metrics on http://%s:%d/metrics", *address)
    mode = "dry run" if runner.dry_run else "acting"
    log.info(
        "controller started (%s, %d policies, every %gs)",
        mode,
        len(config.policies),
        config.interval,
    )
    try:
        runner.run(args.ticks)
    finally:
        runner.close()
    log.info("controller stopped")
    return 0


def explain(path: str | None, config_file: str, last: int) -> int:
    if not path:
        log.error(
            "autoscale explain: %s: decisions: not set, so the controller keeps no "
            "record to explain",
            config_file,
        )
        return 2
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError) as error:
        log.error("autoscale explain: %s: %s", path, error)
        return 2
    try:
        return _explain(record, last)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # a file of another shape (not what the controller writes): say so, no traceback
        log.error(
            "autoscale explain: %s: not a decisions file of the controller (%s: %s)",
            path,
            type(error).__name__,
            error,
        )
        return 2


def _explain(record: Any, last: int) -> int:
    if record.get("dry_run"):
        print("dry run: nothing below was applied")
    changes = record.get("changes", {})
    for policy, decisions in record.get("policies", {}).items():
        print(f"policy {policy}:")
        print(" last changes:" if changes.get(policy) else " no change made yet")
        for decision in changes.get(policy, []):
            print("\n".join(describe(decision)))
        print(f" last {min(last, len(decisions))} decisions:")
        for decision in decisions[-last:]:
            print("\n".join(describe(decision)))
    return 0


def describe(d: dict[str, Any]) -> list[str]:
    """One decision of the decisions file, as ``explain`` prints it."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d["at"]))
    before = d["previous"]
    if d["action"] == "set":
        verb = {"set": "SET ", "would-set": "WOULD SET", "failed": "FAILED"}.get(
            d.get("outcome", "set"), "SET "
        )
        limits = (
            f"capacity {before['capacity']} → {d['capacity']}, "
            f"refill {before['refill_rate']:g} → {d['refill_rate']:g}/s"
        )
    else:
        verb = "hold"
        limits = f"capacity {d['capacity']}, refill {d['refill_rate']:g}/s"
    lines = [f"  {when}  {verb} {d['target']} ({d['reason']}): {limits}", f"      why: {d['why']}"]
    problems = d.get("problems", {})
    for name, view in d["signals"].items():
        if view["stale"]:
            detail = "STALE" + (f" ({problems[name]})" if name in problems else "")
        elif view["forecast"] is None:
            detail = f"now {view['value']:.4g}, no forecast yet"
        else:
            detail = (
                f"now {view['value']:.4g}, forecast {view['forecast']:.4g} "
                f"[{view['low']:.4g}, {view['high']:.4g}]"
            )
        lines.append(f"      {name}: {detail}")
    return lines

"""One logging setup: named loggers under ``bucketmesh``, configured once by the
process (``configure``), writing ``bucketmesh: <message>`` lines to stderr.

Modules take ``log = logger("wal")`` and never print; a library user who embeds
bucketmesh configures ``logging`` as they like instead."""

from __future__ import annotations

import logging
import sys

ROOT = "bucketmesh"


def logger(name: str) -> logging.Logger:
    """The logger of one part of bucketmesh (``bucketmesh.<name>``)."""
    return logging.getLogger(f"{ROOT}.{name}")


def configure(level: int = logging.INFO) -> None:
    """Send bucketmesh's records to stderr as ``bucketmesh: message`` (idempotent)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    if not any(getattr(h, "_bucketmesh", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{ROOT}: %(message)s"))
        handler._bucketmesh = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False

"""Operating a mesh: the commands an operator (or a CronJob) runs against live regions.

| module | what it owns |
|---|---|
| ``reconcile.py`` | ``bucketmesh reconcile``: regions compared key by key, repaired to the join |
| ``syncclient.py`` | the sync protocol spoken as a client (hello, pull, push) |
| ``metrics_export.py`` | ``bucketmesh metrics export``: nodes' Prometheus families to CSV |
| ``audit.py`` | ``bucketmesh audit duplicates``: requests charged twice in audit trails |

docs/operations.md is the operator's guide to all of them.
"""

from __future__ import annotations

from typing import Any

from bucketmesh.tooling.ops.reconcile import ConfigLoader


def add_parsers(sub: Any, load_config: ConfigLoader | None = None) -> None:
    """Register ``reconcile``, ``metrics`` and ``audit`` on the ``bucketmesh`` command's subparsers;
    ``load_config`` reads a node's config file (the node layer passes its loader)."""
    from bucketmesh.tooling.ops import audit, metrics_export, reconcile

    reconcile.add_parser(sub, load_config)
    metrics_export.add_parser(sub)
    audit.add_parser(sub)


__all__ = ["add_parsers"]

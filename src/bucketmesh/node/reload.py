"""Secret files read again when they change: ``sync.secretFile`` and
``admin.tokenFile`` hold one secret per line, and a running node applies a new
list within ``CHECK_EVERY_S`` of the file changing (mtime, size or inode), so a
rotation (docs/security.md) needs no restart. A file that cannot be read, or is
empty, keeps the secrets in use: the error is logged and counted, and the next
change is tried again. Certificate files are reloaded by ``http/tls.py`` itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, Metric

from bucketmesh.node.config import read_secret_file
from bucketmesh.telemetry.log import logger

CHECK_EVERY_S = 1.0

log = logger("reload")


def _stamp(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class _Watched:
    field: str  # the config field naming the file, for logs and metrics
    path: str
    apply: Callable[[Sequence[str]], None]
    stamp: tuple[int, int, int]
    reloads: int = 0
    failures: int = 0


@dataclass
class SecretFiles:
    """The secret files of one node and what to do with their new contents."""

    watched: list[_Watched] = field(default_factory=list)

    def add(self, field: str, path: str, apply: Callable[[Sequence[str]], None]) -> None:
        """Call ``apply(secrets)`` whenever the file at ``path`` changes (it was read
        at start-up already)."""
        self.watched.append(_Watched(field, path, apply, _stamp(path)))

    def check(self) -> None:
        """Apply every file that changed since it was last looked at."""
        for watched in self.watched:
            stamp = _stamp(watched.path)
            if stamp == watched.stamp:
                continue
            watched.stamp = stamp
            try:
                secrets = read_secret_file(watched.path)
                if not secrets:
                    raise ValueError("the file is empty")
            except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
                watched.failures += 1
                log.error(
                    "%s %r changed but cannot be used (the previous secrets stay): %s",
                    watched.field,
                    watched.path,
                    error,
                )
                continue
            watched.apply(secrets)
            watched.reloads += 1
            log.info("%s reloaded: %d secret(s), the first signs", watched.field, len(secrets))

    def metric_families(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "bucketmesh_secret_reloads",
            "Secret files (sync.secretFile, admin.tokenFile) applied after they changed",
            labels=["file"],
        )
        failures = CounterMetricFamily(
            "bucketmesh_secret_reload_failures",
            "Changed secret files that could not be used (the previous secrets stay)",
            labels=["file"],
        )
        for watched in self.watched:
            reloads.add_metric([watched.field], watched.reloads)
            failures.add_metric([watched.field], watched.failures)
        yield reloads
        yield failures

"""The keys of a replica by sync range, so that a pull of a few ranges reads those ranges'
keys instead of scanning every bucket (issue 16: a million buckets, 52 pulls, 52 full scans).

The limiter's ``buckets`` is a plain dict and knows nothing of ranges; this index follows it
without a hook in the core, relying on one property of a dict: a key inserted after another
iterates after it. The index remembers the newest key it has seen (the *mark*) and that
key's bucket object. On each use it reads ``reversed(buckets)`` from the newest key back to
the mark: those are the keys inserted since, and they are added to their ranges. If the mark
is gone, or holds another bucket object (it was dropped, and maybe inserted again at the
end), nothing says where the new keys stop: the index is rebuilt from a full scan, in slices
that let decisions through. A full scan also happens when the new keys are too many to read
in one go (``CATCH_UP_LIMIT``: a flood of new keys since the last pull).

Keys dropped from the limiter stay in their range until that range is read: ``live`` skips
and forgets them. So the index may hold dead keys, never miss a live one, and a caller
always looks each key up in ``buckets`` again (it does anyway: a bucket may have expired).
A rebuild also happens when dead keys outnumber live ones, so the index stays within about
twice the live key count. It costs ~27 bytes per key (27 MB at a million buckets, next to
~300 MB for the buckets themselves), and exists only on a node that has answered a pull or
a digest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Final

from bucketmesh.core.bucket import Bucket
from bucketmesh.replication import protocol as sync

__all__ = ["RangeIndex"]

#: Keys read in one go from the newest back to the mark; beyond, a sliced full rebuild.
CATCH_UP_LIMIT: Final = 20_000
#: Keys indexed between two yields to the event loop during a rebuild.
REBUILD_SLICE: Final = 5_000


class RangeIndex:
    """The keys of ``buckets``, by ``protocol.range_of``; see the module docstring."""

    def __init__(self, buckets: Mapping[str, Bucket]) -> None:
        self.buckets = buckets
        self.ranges: list[dict[str, None]] = [{} for _ in range(sync.RANGES)]
        self.size = 0  # keys held, dead ones included
        self.rebuilds = 0
        self._built = False
        self._mark: str | None = None
        self._mark_bucket: Bucket | None = None
        self._lock = asyncio.Lock()

    async def live(self, ranges: Collection[int]) -> list[str]:
        """The keys of ``buckets`` in ``ranges`` (ascending range, then insertion order);
        forgets the dead keys it meets there."""
        async with self._lock:  # one rebuild at a time; catching up never yields
            if not self._built or not self._catch_up():
                await self._rebuild()
        buckets = self.buckets
        keys: list[str] = []
        for r in sorted(set(ranges)):
            held = self.ranges[r]
            dead = [key for key in held if key not in buckets]
            for key in dead:
                del held[key]
            self.size -= len(dead)
            keys.extend(held)
        return keys

    def _catch_up(self) -> bool:
        """Add the keys inserted since the mark; False when a rebuild is needed instead."""
        buckets = self.buckets
        if self.size > 2 * len(buckets) + CATCH_UP_LIMIT:
            return False
        if not buckets:
            return self._mark is None
        if not isinstance(buckets, dict):
            return False  # no insertion order to rely on
        mark, mark_bucket = self._mark, self._mark_bucket
        if mark is not None and buckets.get(mark) is not mark_bucket:
            return False
        fresh: list[str] = []
        for key in reversed(buckets):
            if key == mark:
                break
            fresh.append(key)
            if len(fresh) > CATCH_UP_LIMIT:
                return False
        else:
            if mark is not None:
                return False  # the mark vanished while we read: start again
        if fresh:
            self._add(reversed(fresh))
            self._set_mark(fresh[0])
        return True

    def _add(self, keys: object) -> None:
        ranges, range_of = self.ranges, sync.range_of
        added = 0
        for key in keys:  # type: ignore[attr-defined]
            held = ranges[range_of(key)]
            if key not in held:
                held[key] = None
                added += 1
        self.size += added

    def _set_mark(self, key: str | None) -> None:
        self._mark = key
        self._mark_bucket = self.buckets.get(key) if key is not None else None

    async def _rebuild(self) -> None:
        """Index every key, a slice at a time; keys inserted meanwhile are caught up after."""
        self.rebuilds += 1
        self.ranges = [{} for _ in range(sync.RANGES)]
        self.size = 0
        keys = list(self.buckets)
        self._set_mark(keys[-1] if keys else None)
        for start in range(0, len(keys), REBUILD_SLICE):
            self._add(keys[start : start + REBUILD_SLICE])
            if len(keys) > REBUILD_SLICE:
                await asyncio.sleep(0)
        self._built = True
        if not self._catch_up():
            # The mark was dropped during the slices (rare: the newest key expired): add
            # whatever was inserted meanwhile from one synchronous pass instead.
            keys = list(self.buckets)
            self._add(keys)
            self._set_mark(keys[-1] if keys else None)

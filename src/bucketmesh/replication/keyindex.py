"""The keys of a replica by sync range, so that a pull of a few ranges reads those ranges'
keys instead of scanning every bucket (issue 16: a million buckets, 52 pulls, 52 full scans).

The limiter's ``buckets`` is a plain dict and knows nothing of ranges; this index follows it
without a hook in the core, relying on one property of a dict: a key inserted after another
iterates after it. The index remembers the newest key it has seen (the *mark*) and that
key's bucket object. On each use it reads ``reversed(buckets)`` from the newest key back to
the mark: those are the keys inserted since, and they are added to their ranges. If the mark
is gone, or holds another bucket object (it was dropped, and maybe inserted again at the
end), nothing says where the new keys stop: the index is rebuilt from a full scan, in slices
that let decisions through. The keys found since the mark are listed in one pass (cheap) and
indexed in slices too, however many (a flood of new keys since the last pull): no step of the
index holds the event loop for more than ``REBUILD_SLICE`` keys.

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
from collections.abc import Collection, Iterable, Mapping
from typing import Final

from bucketmesh.core.bucket import Bucket
from bucketmesh.replication import protocol as sync

__all__ = ["RangeIndex"]

#: Dead keys the index may hold beyond twice the live ones before it is rebuilt.
CATCH_UP_LIMIT: Final = 20_000
#: Keys indexed between two yields to the event loop (a rebuild, a catch-up).
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
        async with self._lock:  # one catch-up or rebuild at a time
            if not self._built or not await self._catch_up():
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

    def _fresh(self) -> list[str] | None:
        """The keys inserted since the mark, newest first; None when a rebuild is needed
        instead (the mark is gone, or dead keys outnumber live ones). Listing them is one
        synchronous pass of ``reversed(buckets)`` (tens of ns a key); indexing them is
        not, and is done in slices by the caller."""
        buckets = self.buckets
        if self.size > 2 * len(buckets) + CATCH_UP_LIMIT:
            return None
        if not buckets:
            return [] if self._mark is None else None
        if not isinstance(buckets, dict):
            return None  # no insertion order to rely on
        mark, mark_bucket = self._mark, self._mark_bucket
        if mark is not None and buckets.get(mark) is not mark_bucket:
            return None
        fresh: list[str] = []
        for key in reversed(buckets):
            if key == mark:
                break
            fresh.append(key)
        else:
            if mark is not None:
                return None  # the mark vanished while we read: start again
        return fresh

    async def _catch_up(self) -> bool:
        """Add the keys inserted since the mark, ``REBUILD_SLICE`` at a time with the event
        loop let through between slices; False when a rebuild is needed instead.

        Under a flood of new keys (R6: 37,000 a second on a node whose turns last tens of
        milliseconds) a rebuild's slices let hundreds of thousands of keys in meanwhile:
        catching those up in one piece (as this did, from a full synchronous pass, once
        they exceeded ``CATCH_UP_LIMIT``) stopped the flooded loop for ~0.45 s. The mark
        moves to the newest key listed, so keys inserted during the slices are the next
        catch-up's; a listed key dropped meanwhile is indexed dead, as any dropped key."""
        fresh = self._fresh()
        if fresh is None:
            return False
        if fresh:
            self._set_mark(fresh[0])
            fresh.reverse()  # insertion order within each range
            await self._add_sliced(fresh)
        return True

    async def _add_sliced(self, keys: list[str]) -> None:
        for start in range(0, len(keys), REBUILD_SLICE):
            self._add(keys[start : start + REBUILD_SLICE])
            if len(keys) > REBUILD_SLICE:
                await asyncio.sleep(0)

    def _add(self, keys: Iterable[str]) -> None:
        ranges, range_of = self.ranges, sync.range_of
        added = 0
        for key in keys:
            held = ranges[range_of(key)]
            if key not in held:
                held[key] = None
                added += 1
        self.size += added

    def _set_mark(self, key: str | None) -> None:
        self._mark = key
        self._mark_bucket = self.buckets.get(key) if key is not None else None

    async def _rebuild(self) -> None:
        """Index every key, a slice at a time; keys inserted meanwhile are caught up after
        (in slices too). If the mark was dropped during the slices (rare: the newest key
        expired), nothing says where the keys inserted since begin: the rebuild starts
        over, in slices again, until a catch-up succeeds."""
        self.rebuilds += 1
        while True:
            self.ranges = [{} for _ in range(sync.RANGES)]
            self.size = 0
            keys = list(self.buckets)
            self._set_mark(keys[-1] if keys else None)
            await self._add_sliced(keys)
            self._built = True
            if await self._catch_up():
                return

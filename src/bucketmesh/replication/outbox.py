"""A peer's outbox, pure: what this node still has to send to one peer, and what is in
flight. No sockets, no clock reads, no tasks: the mesh hands it encoded deltas with
their collect time and tells it what was acknowledged or failed.

A delta holds absolute values, so a newer delta of a key replaces the queued one and
subsumes it. An outbox that grows past ``max_pending`` keys is dropped whole (the
peer then needs a full-state transfer, which subsumes everything dropped)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bucketmesh.core.bucket import BucketConfig


class Outbox:
    """Queued deltas by key (with the oldest change each must deliver), the ones in
    flight, and rule configs to send."""

    def __init__(self) -> None:
        self.queued: dict[str, tuple[bytes, int]] = {}
        # key -> (delta, collect time) of each message in flight that carries the key
        self.inflight: dict[str, list[tuple[bytes, int]]] = {}
        self.rules: dict[str, BucketConfig] = {}
        self.backlogs_dropped = 0
        self.oversized = 0

    def offer(
        self,
        encoded: Sequence[tuple[str, bytes]],
        rules: Mapping[str, BucketConfig],
        collected_ns: int,
        max_pending: int,
    ) -> bool:
        """Queue deltas (a newer one replaces a queued one of the same key, keeping the
        older collect time for the lag); False if the backlog overflowed and was dropped.

        A delta that replaces one already in flight starts its own clock: the message
        in flight carries everything up to its delta, so keeping its collect time
        would make the lag of a key updated faster than the round trip grow without
        bound (``unsent`` restores the older time if that message fails)."""
        queued_all = self.queued
        inflight = self.inflight
        for key, data in encoded:
            queued = queued_all.get(key)
            if queued is None:
                queued_all[key] = (data, collected_ns)
            else:
                fresh = any(sent[0] is queued[0] for sent in inflight.get(key, ()))
                queued_all[key] = (data, collected_ns if fresh else queued[1])
        self.rules.update(rules)
        if len(queued_all) > max_pending:
            queued_all.clear()
            self.backlogs_dropped += 1
            return False
        return True

    def take(self, budget: int) -> tuple[list[str], list[bytes], int | None]:
        """The oldest queued deltas that fit in ``budget`` bytes (at least one), without
        removing them; a delta that could never fit is dropped (and counted). A delta
        already in flight in another message is not taken again."""
        keys: list[str] = []
        chunks: list[bytes] = []
        size = 0
        origin: int | None = None
        inflight = self.inflight
        oversized: list[str] = []
        # no copy of the queue: after a flood of new keys it holds hundreds of
        # thousands, and a copy per message made draining it quadratic (R6)
        for key, (data, collected) in self.queued.items():
            if key in inflight and any(sent[0] is data for sent in inflight[key]):
                continue
            if len(data) > budget:
                oversized.append(key)
                continue
            if size + len(data) > budget:
                break
            keys.append(key)
            chunks.append(data)
            size += len(data)
            origin = collected if origin is None or collected < origin else origin
            inflight.setdefault(key, []).append((data, collected))
        for key in oversized:
            del self.queued[key]
            self.oversized += 1
        return keys, chunks, origin

    def oldest(self) -> int | None:
        """About the oldest collect time queued: the first key's (keys queue in the order
        they were first offered; a replaced delta keeps its place). None when empty."""
        for _, collected in self.queued.values():
            return collected
        return None

    def takeable(self) -> bool:
        """Whether a queued delta is not in flight yet."""
        inflight = self.inflight
        if len(self.queued) > len(inflight):
            return True  # a queued key is not in flight at all: no scan (R6: 8 senders
            # asked at every collect while thousands of keys were in flight)
        return any(
            not any(sent[0] is data for sent in inflight.get(key, ()))
            for key, (data, _) in self.queued.items()
        )

    def _landed(self, key: str, data: bytes) -> tuple[bytes, int] | None:
        """Forget ``data`` of ``key`` as in flight; returns its entry."""
        sent = self.inflight.get(key)
        if not sent:
            return None
        for i, entry in enumerate(sent):
            if entry[0] is data:
                del sent[i]
                if not sent:
                    del self.inflight[key]
                return entry
        return None

    def unsent(self, keys: Sequence[str], chunks: Sequence[bytes]) -> None:
        """The message carrying ``keys`` failed: what is queued for them is now as old
        as the oldest change it must deliver."""
        for key, data in zip(keys, chunks, strict=True):
            sent = self._landed(key, data)
            queued = self.queued.get(key)
            if sent is not None and queued is not None and sent[1] < queued[1]:
                self.queued[key] = (queued[0], sent[1])

    def acknowledge(
        self, keys: Sequence[str], chunks: Sequence[bytes], rules: Mapping[str, BucketConfig]
    ) -> None:
        queued_all = self.queued
        for key, data in zip(keys, chunks, strict=True):
            self._landed(key, data)
            queued = queued_all.get(key)
            if queued is not None and queued[0] is data:
                del queued_all[key]
        for name, config in rules.items():
            if self.rules.get(name) is config:
                del self.rules[name]

    def clear(self) -> None:
        """Forget everything queued (a full-state transfer subsumes it)."""
        self.queued.clear()
        self.rules.clear()

"""MurmurHash3 key affinity: a stable ring over a region's nodes.

Correctness never depends on affinity (every node decides every key on its own
replica, and the replicas converge); affinity makes each key's decisions land on
**one replica per region**, which is what keeps concurrent over-admission low: N
nodes of a region deciding one key at once may together grant up to N × the
tokens left before their deltas meet, while one node grants them once.

The ring is a classic consistent-hash ring: every node name is placed at
``points`` positions (virtual nodes), ``MurmurHash3_x64_128(f"{name}#{i}")``; a key
belongs to the first position clockwise from ``MurmurHash3_x64_128(key)``. It
depends on nothing but the node *names* and the key's bytes, so:

* it is the same in every process and every host (MurmurHash3 with seed 0, not
  Python's per-process salted ``hash()``);
* it is the same in every region when the regions name their nodes alike
  (``node-a``, ``node-b``, ... in each): a key's owner is ``node-b`` in
  ``us-east-1`` and ``node-b`` in ``eu-west-1``;
* adding or removing one node of N moves about 1/N of the keys (only those the
  node takes over or gives up), never reshuffles the rest.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import mmh3

#: Virtual nodes per node: enough that each of a few nodes gets its share of keys
#: within a few percent (the standard deviation of a node's share is about
#: ``1/sqrt(points)`` of it).
DEFAULT_POINTS = 160


def key_hash(data: str) -> int:
    """The 64-bit position of ``data`` on the ring (the low half of MurmurHash3_x64_128,
    seed 0, over its UTF-8 bytes)."""
    return int(mmh3.hash64(data.encode("utf-8"), 0, signed=False)[0])


class Ring:
    """A consistent-hash ring over node names (see the module's docstring).

    ``Ring(["node-a", "node-b", "node-c"]).owner("user-42")`` names the node that
    owns the key. Names must be distinct and non-empty; their order does not matter.
    """

    def __init__(self, nodes: Iterable[str], *, points: int = DEFAULT_POINTS) -> None:
        names = list(nodes)
        if not names:
            raise ValueError("a ring needs at least one node")
        if not isinstance(points, int) or isinstance(points, bool) or points < 1:
            raise ValueError(f"points must be an integer >= 1, got {points!r}")
        seen: set[str] = set()
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"node names must be non-empty strings, got {name!r}")
            if name in seen:
                raise ValueError(f"node {name!r} is listed twice")
            seen.add(name)
        self.nodes: tuple[str, ...] = tuple(sorted(names))
        self.points = points
        placed = sorted(
            (key_hash(f"{name}#{index}"), name) for name in self.nodes for index in range(points)
        )
        self._hashes = [position for position, _ in placed]
        self._owners = [name for _, name in placed]

    def owner(self, key: str) -> str:
        """The node that owns ``key``: the first ring position at or after its hash."""
        index = bisect.bisect_left(self._hashes, key_hash(key))
        if index == len(self._hashes):
            index = 0
        return self._owners[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"Ring({list(self.nodes)!r}, points={self.points})"


__all__ = ["DEFAULT_POINTS", "Ring", "key_hash"]

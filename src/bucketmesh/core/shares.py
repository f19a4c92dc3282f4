"""Strict mode's transferable shares: the rights ledger of one key, and the rebalancer.

Rights
------
A strict key's limit (capacity C, refill rate r) is divided into ``SCALE`` parts
of rights. A region holding h parts runs a bucket of capacity ``C·h // SCALE``
and refill ``r·h / SCALE`` (its emission interval rounded up), so the regions'
buckets together never hold more than C nor refill faster than r, whatever
the regions hold, as long as the holdings sum to at most ``SCALE``.

The ledger (``Ledger``) is a join-semilattice, merged like every other part of
the state (commutative, associative, idempotent; a lost, repeated or late
message never creates rights):

``founders``
    the regions the limit was first divided over, each starting with
    ``SCALE // len(founders)`` parts (a region added later starts with none and is
    given its floor by the others). Set once.
``given[(giver replica, region)]``
    parts the giver (a replica id: region/node/incarnation) has handed to that
    region: a grow-only counter only the giver writes, merged by max.
``tokens[(giver replica, region)]``
    tokens handed over with the parts (the giver's level above its new capacity,
    which would otherwise be lost): grow-only, written by the giver.
``taken[region]``
    tokens the region has credited to its bucket out of those handed to it
    (grow-only, written by that region, so a restart credits none twice).
``reports[region]``
    what the region last said of itself, last-writer-wins by its stamp: its recent
    demand (milli-tokens per second), the parts it can spend now, and the limit
    (capacity, interval) it runs on — the rebalancer's input, never a right.

A region's holding is ``initial + Σ given to it − Σ given by its replicas``. Its
own replicas' counters are exact where it decides; what it has received is
what it has learned, never more than was given. So the holdings that the
regions *use* sum to at most ``SCALE`` at every instant, under any partition:
``Σ initial ≤ SCALE`` and a gift counts at its receiver only after its giver
counted it.

A replica that starts without its previous life's state (no snapshot) does not
know what that life gave away: it is *blind* and spends only its floor (a region
never gives below its floor, so it holds at least that) less what it gives
itself, until it has pulled the state of every other region. A region that sees
a newer incarnation of a node (any message from it, a pull first of all)
*freezes* the older incarnations' gift counters: they no longer rise there, so a
gift of the dead life still in flight can no longer be taken by anyone who
answered the pull, and the pulled ledgers hold every gift that will ever count.
Then the replica spends its ledger holding again, and forfeits the tokens handed
to its region so far (its previous life may have credited them). See
docs/sync.md.

The rebalancer
--------------
``plan`` is the policy, pure: from the reports (demand of every region), it
computes target holdings with a floor per region: every region its floor, then
each its need when the needs fit (idle rights follow demand, in proportion),
else in proportion to what each wants (Doorman's ProportionalShare; FairShare's
max-min split would give a region with nine times the demand no more than a
quiet one once both want more than an equal part), and
returns what *this* region should give: a damped part (``damping``) of its
excess over its target, to the regions below theirs, in proportion to their
deficit. A region only ever gives; it takes nothing. The node runs it only
while every peer is up, so during a partition nothing moves.

This module does no I/O and reads no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

SCALE: Final = 72_072_000
"""Parts of rights in a whole limit: divisible by every region count from 1 to 16,
so that equal initial shares of a capacity C ≥ R are at least one token each."""

FLOOR_FRACTION: Final = 0.01
"""The default floor: each region keeps at least 1 % of the limit and one token of
capacity (a quiet region can still serve its first requests), never more than an
equal share."""

DAMPING: Final = 0.5
"""The part of its excess a region gives in one round: rights converge geometrically
toward the targets instead of oscillating."""

HYSTERESIS: Final = SCALE // 200
"""Excess below 0.5 % of the limit is not worth a transfer."""


class ShareReport(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """What a region says of itself (last-writer-wins by ``stamp``): its demand, the
    parts it can spend, the whole limit it runs on and the one it ran on before."""

    stamp: int
    demand_milli: int
    held: int
    capacity: int
    interval_ns: int
    prev_capacity: int
    prev_interval_ns: int


class ShareState(msgspec.Struct, array_like=True, gc=False):
    """A ledger on the wire and in snapshots: ``given``/``tokens`` keys are
    ``"<giver replica id>><region>"``."""

    founders: tuple[str, ...]
    given: dict[str, int] = {}
    tokens: dict[str, int] = {}
    reports: dict[str, ShareReport] = {}
    taken: dict[str, int] = {}
    acks: dict[str, tuple[str, ...]] = {}


def region_of(replica_id: str) -> str:
    return replica_id.partition("/")[0]


def handover_giver(region: str) -> str:
    """The giver id under which a removed region's rights are handed over: its own
    region (its holding goes down), written by the remaining regions, all alike."""
    return f"{region}/handover"


def _pair(text: str) -> tuple[str, str] | None:
    giver, sep, region = text.rpartition(">")
    if not sep or not giver or not region:
        return None
    return giver, region


@dataclass
class Ledger:
    """The rights ledger of one strict key (see the module docstring)."""

    founders: tuple[str, ...]
    given: dict[tuple[str, str], int] = field(default_factory=dict)
    tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    reports: dict[str, ShareReport] = field(default_factory=dict)
    #: region -> tokens it has credited to its bucket out of those handed to it
    #: (grow-only, written by that region)
    taken: dict[str, int] = field(default_factory=dict)
    #: (witness region, removed region) -> the region list the witness runs with,
    #: written once by the witness when the removed region left its list (it takes
    #: nothing more from that region from then on): the handover's agreement
    acks: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    # -- reading -----------------------------------------------------------------

    def initial(self, region: str) -> int:
        return SCALE // len(self.founders) if region in self.founders else 0

    def received(self, region: str) -> int:
        return sum(n for (_, to), n in self.given.items() if to == region)

    def given_by(self, region: str, replica: str | None = None) -> int:
        """Parts given by ``region``'s replicas (only ``replica``'s, if named)."""
        return sum(
            n
            for (giver, _), n in self.given.items()
            if (giver == replica if replica is not None else region_of(giver) == region)
        )

    def holding(self, region: str) -> int:
        """Parts ``region`` holds as far as this ledger knows: exact for its own gifts,
        a lower bound of what it received."""
        return self.initial(region) + self.received(region) - self.given_by(region)

    def tokens_received(self, region: str) -> int:
        return sum(n for (_, to), n in self.tokens.items() if to == region)

    def regions(self) -> set[str]:
        """Every region the ledger names: founders, receivers, givers, reporters."""
        out = set(self.founders)
        out.update(to for _, to in self.given)
        out.update(region_of(giver) for giver, _ in self.given)
        out.update(self.reports)
        return out

    # -- writing (only for this replica's own entries) ----------------------------

    def give(self, replica: str, region: str, parts: int, tokens: int = 0) -> None:
        if parts < 0 or tokens < 0:
            raise ValueError("a gift is never negative")
        if region == region_of(replica):
            raise ValueError("a region gives to another region")
        pair = (replica, region)
        if parts:
            self.given[pair] = self.given.get(pair, 0) + parts
        if tokens:
            self.tokens[pair] = self.tokens.get(pair, 0) + tokens

    def report(self, region: str, report: ShareReport) -> bool:
        known = self.reports.get(region)
        if known is not None and known.stamp >= report.stamp:
            return False
        self.reports[region] = report
        return True

    # -- the lattice -------------------------------------------------------------

    def merge(self, other: Ledger, accept: Callable[[str], bool] | None = None) -> bool:
        """Join ``other`` in; returns whether anything changed. Founders are set once:
        the first known wins (a conflict keeps the smaller tuple, so every replica
        agrees — docs/sync.md says when two can differ). ``accept(giver)`` False:
        that giver's counters are frozen here (a superseded incarnation, see the
        module docstring): they no longer rise."""
        changed = False
        if (
            other.founders != self.founders
            and other.founders
            and (not self.founders or other.founders < self.founders)
        ):
            self.founders = other.founders
            changed = True
        for table, theirs in ((self.given, other.given), (self.tokens, other.tokens)):
            for pair, n in theirs.items():
                if n > table.get(pair, 0) and (accept is None or accept(pair[0])):
                    table[pair] = n
                    changed = True
        for region, report in other.reports.items():
            changed = self.report(region, report) or changed
        for region, n in other.taken.items():
            if n > self.taken.get(region, 0):
                self.taken[region] = n
                changed = True
        for pair, members in other.acks.items():
            known = self.acks.get(pair)
            if known is None or (members != known and members < known):
                self.acks[pair] = members
                changed = True
        return changed

    # -- handing a removed region's rights over ---------------------------------------

    def handover_ready(self, removed: Iterable[str], members: tuple[str, ...]) -> bool:
        """Every region of ``members`` has acknowledged every ``removed`` region's
        removal with this same region list."""
        return all(
            self.acks.get((witness, gone)) == members for witness in members for gone in removed
        )

    def handover(self, region: str, members: tuple[str, ...]) -> dict[str, int]:
        """The handover of removed ``region``'s rights to ``members``: everything it
        holds apart from earlier handovers, in equal parts (the last the remainder).
        Deterministic in the ledger, so every member computes the same once the
        ledger holds the final counters (docs/sync.md); written by max."""
        giver = handover_giver(region)
        handed = sum(n for (g, _), n in self.given.items() if g == giver)
        total = max(0, self.holding(region) + handed)
        names = sorted(members)
        out = {name: total // len(names) for name in names}
        out[names[-1]] += total - sum(out.values())
        return out

    def write_handover(self, region: str, parts: Mapping[str, int]) -> bool:
        giver = handover_giver(region)
        changed = False
        for name, n in parts.items():
            if n > self.given.get((giver, name), 0):
                self.given[(giver, name)] = n
                changed = True
        return changed

    def state(self) -> ShareState:
        return ShareState(
            self.founders,
            {f"{g}>{r}": n for (g, r), n in self.given.items()},
            {f"{g}>{r}": n for (g, r), n in self.tokens.items()},
            dict(self.reports),
            dict(self.taken),
            {f"{w}>{r}": members for (w, r), members in self.acks.items()},
        )

    @classmethod
    def from_state(cls, state: ShareState) -> Ledger:
        """A ledger from the wire: malformed or negative entries are dropped."""
        ledger = cls(tuple(state.founders))
        for table, raw in ((ledger.given, state.given), (ledger.tokens, state.tokens)):
            for text, n in raw.items():
                pair = _pair(text)
                if pair is not None and n > 0 and region_of(pair[0]) != pair[1]:
                    table[pair] = n
        for region, report in state.reports.items():
            if report.held >= 0 and report.demand_milli >= 0:
                ledger.reports[region] = report
        ledger.taken = {region: n for region, n in state.taken.items() if n > 0}
        for text, members in state.acks.items():
            pair = _pair(text)
            if pair is not None and members:
                ledger.acks[pair] = tuple(members)
        return ledger


def floor_parts(regions: int, capacity: int, fraction: float = FLOOR_FRACTION) -> int:
    """Each region's floor: ``fraction`` of the limit and at least one token of
    capacity, never more than an equal share."""
    least = -(-SCALE // max(1, capacity))
    return min(max(int(SCALE * fraction), least), SCALE // max(1, regions))


def targets(
    members: Iterable[str], demand: Mapping[str, int], total: int, floor: int
) -> dict[str, int]:
    """Target holdings (parts) summing to at most ``total``: a floor each, then the
    needs if they fit (the rest in proportion to demand), else ProportionalShare.
    ``demand`` is each region's need in parts (missing: no demand)."""
    names = sorted(members)
    if not names:
        return {}
    floor = min(floor, total // len(names))
    out = {name: floor for name in names}
    remaining = total - floor * len(names)
    wants = {name: max(0, demand.get(name, 0) - floor) for name in names}
    wanted = sum(wants.values())
    if wanted > remaining:
        # oversubscribed: Doorman's ProportionalShare, in proportion to what is wanted
        for name in names:
            out[name] += remaining * wants[name] // wanted
        return out
    for name in names:
        out[name] += wants[name]
    remaining -= wanted
    if remaining > 0:
        # idle rights go where the demand is (in proportion), else equally
        weights = {name: demand.get(name, 0) for name in names}
        weight = sum(weights.values())
        if weight <= 0:
            weights = {name: 1 for name in names}
            weight = len(names)
        for name in names:
            out[name] += remaining * weights[name] // weight
    return out


def plan(
    me: str,
    held: int,
    members: Iterable[str],
    holdings: Mapping[str, int],
    *,
    demand_parts: Mapping[str, int],
    floor: int,
    damping: float = DAMPING,
    hysteresis: int = HYSTERESIS,
) -> dict[str, int]:
    """What region ``me`` (holding ``held`` parts it can spend) gives now: region ->
    parts. ``holdings``: what the others hold as far as ``me`` knows (their reports,
    else the ledger); ``demand_parts`` every region's need. Empty when the excess over
    the target is below ``hysteresis``."""
    names = set(members) | {me}
    holdings = {name: holdings.get(name, 0) for name in names}
    holdings[me] = held
    goal = targets(names, demand_parts, SCALE, floor)
    excess = held - max(goal[me], floor)
    if excess <= hysteresis:
        return {}
    deficits = {
        name: goal[name] - holdings[name]
        for name in names
        if name != me and goal[name] > holdings[name]
    }
    short = sum(deficits.values())
    if short <= 0:
        return {}
    budget = min(int(excess * damping) or excess, short)
    out = {}
    for name in sorted(deficits):
        parts = budget * deficits[name] // short
        if parts > 0:
            out[name] = parts
    return out


def share_limits(capacity: int, interval_ns: int, parts: int) -> tuple[int, int]:
    """(capacity, emission interval) of a region holding ``parts`` of a limit: the
    capacity rounded down, the interval rounded up (a slower refill), so the sum over
    regions never exceeds the limit. Nothing held: capacity 0 (nothing is admitted)."""
    if parts <= 0:
        return 0, interval_ns * SCALE
    parts = min(parts, SCALE)
    return capacity * parts // SCALE, -(-interval_ns * SCALE // parts)


def burnt_limits(
    capacity: int, interval_ns: int, parts: int, high_capacity: int, high_interval_ns: int
) -> tuple[int, int]:
    """(capacity, emission interval) of the region that PATCHed a strict limit lower,
    holding ``parts``, while another region may still run on the higher limit
    (``high_*``): its share of the high limit less the whole difference (it burns
    the excess the others may still spend), never more than its share of the new
    one. Every other region runs at most its share of the high limit, so the regions
    together stay within the new limit whoever holds what (the burn is linear in
    ``parts``). When its share cannot cover the difference in either dimension it
    spends nothing (capacity 0)."""
    cap, interval = share_limits(capacity, interval_ns, parts)
    parts = max(0, min(parts, SCALE))
    if high_capacity > capacity:
        cap = min(cap, high_capacity * parts // SCALE - (high_capacity - capacity))
    if high_interval_ns < interval_ns:
        # r_hi·p/S − (r_hi − r) = (S·T_hi − (S − p)·T) / (S·T_hi·T) tokens per ns
        room = SCALE * high_interval_ns - (SCALE - parts) * interval_ns
        if room <= 0:
            cap = 0
        else:
            interval = max(interval, -(-SCALE * high_interval_ns * interval_ns // room))
    if cap <= 0:
        return 0, interval_ns * SCALE
    return cap, interval


def burn_covered(
    capacity: int, interval_ns: int, parts: int, high_capacity: int, high_interval_ns: int
) -> bool:
    """Whether ``parts`` of the high limit cover its excess over the new one in both
    dimensions (``burnt_limits`` then spends a positive share)."""
    cap_ok = (
        high_capacity <= capacity or high_capacity * parts >= (high_capacity - capacity) * SCALE
    )
    rate_ok = high_interval_ns >= interval_ns or parts * interval_ns >= SCALE * (
        interval_ns - high_interval_ns
    )
    return cap_ok and rate_ok


__all__ = [
    "DAMPING",
    "FLOOR_FRACTION",
    "HYSTERESIS",
    "SCALE",
    "Ledger",
    "ShareReport",
    "ShareState",
    "burn_covered",
    "burnt_limits",
    "floor_parts",
    "handover_giver",
    "plan",
    "region_of",
    "share_limits",
    "targets",
]

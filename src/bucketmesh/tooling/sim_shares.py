"""Strict mode's transferable shares under a faulty network: the ``strict-shares`` kind.

Each schedule runs real ``Limiter`` replicas (one per region, shares enabled) in
simulated time over a network that drops, duplicates, delays and reorders
messages and partitions regions; regions restart with a snapshot (exact, as the
write-ahead log makes it) or without one (a new, blind incarnation that pulls its
peers later), a region may be added (the others list it first; not a founder:
it starts with no rights), a region may be removed (its node stops after a last
gift, maybe big, delivered late; the others drop it from their lists one by one
and hand its rights over; it may come back on its old list from its snapshot,
busy, after pulling one region of that list), and one
strict key may be PATCHed (raised or lowered, by the region holding most or
any; in half of them the origin is cut off right after, every region quiet until
its bucket is full, then draining it). Demand is skewed and moves. At every step
the total admitted over every window [t1, t2] is checked against what the global
limit allows: ``C + (t2 − t1) / T``. During a PATCH: the lower of the old and new
limit from the PATCH on when the origin's rights above its floor cover a
lowering's excess (it burns it: ``shares.burnt_limits``), else the old limit until
every region runs on the new one (or one divides a raised one); the new limit
after; the larger capacity over a window that spans a change. Which of the two
bounds a lowering gets is what its PATCH answers (``Limiter.pending_lowering``:
200 in force, 202 pending), checked against the coverage condition; docs/sync.md
proves that no coordination-free scheme can do better when the origin does not
cover it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import msgspec

from bucketmesh.core.bucket import NS_PER_S, STRICT, BucketConfig, interval_for
from bucketmesh.core.limiter import DeltaBatch, InvalidTokens, Limiter
from bucketmesh.core.rules import Rule
from bucketmesh.core.shares import burn_covered

MS = 1_000_000
_batch_encode = msgspec.msgpack.Encoder().encode
_batch_decode = msgspec.msgpack.Decoder(DeltaBatch).decode


class Violation(AssertionError):
    """The total admitted exceeded what the global limit allows."""


@dataclass
class Outcome:
    seed: int
    regions: int
    granted: int
    asked: int
    capacity: int
    rate: float
    steps: int
    gifts: int
    events: list[str] = field(default_factory=list)


def run(seed: int, *, steps: int | None = None) -> Outcome:
    """One seeded schedule; raises ``Violation`` at the first step over the limit."""
    rng = random.Random(seed)
    n = rng.choice((2, 3, 3, 4))
    founders = [f"r{i}" for i in range(n)]
    capacity = rng.randint(n, 60)
    rate = round(10 ** rng.uniform(0.3, 2.0), 2)
    rule = Rule.create("k-{{ .Request.ClientIP }}", capacity, rate, name="s", mode=STRICT)
    rules = [rule]
    key = "k-1"
    step_ns = rng.choice((5, 10, 20)) * MS
    steps = steps or rng.randint(80, 200)
    start = 1_700_000_000 * NS_PER_S
    now = start
    incarnation: dict[str, int] = {}
    live: dict[str, Limiter] = {}

    def clock() -> int:
        return now

    def fresh(region: str, blind: bool) -> Limiter:
        incarnation[region] = incarnation.get(region, 0) + 1
        limiter = Limiter(
            rules,
            replica_id=f"{region}/n/{incarnation[region]}",
            regions=len(founders),
            clock=clock,
        )
        if blind:
            limiter.begin_recovery(now, shared=False)
        limiter.enable_shares(region, founders)
        limiter.set_share_regions(current)  # the list it is configured with now
        relist.pop(region, None)
        return limiter

    current = list(founders)  # the region list the operator runs with now
    relist: dict[str, int] = {}  # region -> the step it drops the removed one
    for region in founders:
        live[region] = fresh(region, False)
    pulled: dict[str, set[str]] = {}  # blind region -> regions pulled since its start
    net: list[tuple[int, int, str, str, bytes]] = []  # (deliver at, seq, from, to, batch)
    seq = 0
    drop = rng.choice((0.0, 0.05, 0.2))
    dup = rng.choice((0.0, 0.1))
    delay_max = rng.choice((5, 30, 120)) * MS
    cut: set[frozenset[str]] = set()
    weights = {r: rng.random() ** 3 for r in founders}
    weights[rng.choice(founders)] += 3.0
    grants: list[tuple[int, int]] = []  # (time, tokens) admitted
    asked = 0
    interval = interval_for(rate)
    # the limit's history: (from time, capacity, interval) bounds; during a PATCH the
    # old bound holds until every region runs on the new limit
    limits: list[tuple[int, int, int]] = [(start, capacity, interval)]
    pending_patch: tuple[int, int] | None = None  # (capacity, interval) not yet settled
    patched = False
    removed = ""
    events: list[str] = []
    sync_every = rng.choice((1, 2, 4))
    rebalance_every = rng.choice((2, 5, 10))
    gifts = 0
    quiet_until = 0
    old_list: list[str] = []
    left: dict[str, bytes] = {}  # a removed region's snapshot, for its comeback
    remove_step = rng.randint(10, steps // 2) if rng.random() < 0.3 else -1
    comeback_step = -1
    # a PATCH at a planned step in a third of the schedules (else by chance, late)
    patch_step = rng.randint(steps // 4, steps // 2) if rng.random() < 0.35 else -1
    drain = False
    raises = False
    patch_region = ""
    old_limit = (capacity, interval_for(rate))

    def reachable(a: str, b: str) -> bool:
        return frozenset((a, b)) not in cut

    def send(src: str, batch: DeltaBatch) -> None:
        nonlocal seq
        if not batch.deltas and not batch.rules:
            return
        data = _batch_encode(batch)
        for dst in live:
            if dst == src or not reachable(src, dst) or rng.random() < drop:
                continue
            copies = 2 if rng.random() < dup else 1
            for _ in range(copies):
                seq += 1
                net.append((now + rng.randint(0, delay_max), seq, src, dst, data))

    def check(step: int = -1) -> None:
        # every window ending now: admitted·T_bound ≤ C_bound·T + span (integers)
        if not grants or grants[-1][0] != now:
            return
        total = 0
        for at, tokens in reversed(grants):
            total += tokens
            cap = max(c for since, c, _ in limits if since <= now)
            # the slowest emission interval in effect since ``at`` bounds the refill
            bound_cap = max(
                c
                for i, (since, c, _) in enumerate(limits)
                if i + 1 == len(limits) or limits[i + 1][0] > at
            )
            span_bound = _refill(limits, at, now)
            if total * NS_PER_S > bound_cap * NS_PER_S + span_bound:
                raise Violation(
                    f"seed {seed}: {total} tokens admitted in [{(at - start) / MS:.0f} ms, "
                    f"{(now - start) / MS:.0f} ms] over a limit of {cap} + refill "
                    f"({span_bound / NS_PER_S:.2f}) at step {step}; events: {events}; "
                    f"regions: {_describe(live, key)}"
                )

    for step in range(steps):
        now += step_ns
        # deliveries due
        net.sort()
        while net and net[0][0] <= now:
            _, _, src, dst, data = net.pop(0)
            if dst in live and reachable(src, dst):
                live[dst].merge(_batch_decode(data), now=now)
        # faults and changes
        roll = rng.random()
        if roll < 0.02 and len(founders) > 1:
            a, b = rng.sample(sorted(live), 2)
            cut.add(frozenset((a, b)))
            events.append(f"cut {a}-{b}@{step}")
        elif roll < 0.04 and cut:
            cut.pop()
            events.append(f"heal@{step}")
        elif roll < 0.05:
            region = rng.choice(sorted(live))
            if rng.random() < 0.5:
                restored = Limiter.restore(
                    live[region].snapshot(),
                    rules,
                    replica_id=f"{region}/n/{incarnation[region] + 1}",
                    regions=len(founders),
                    clock=clock,
                )
                incarnation[region] += 1
                restored.enable_shares(region, founders)
                restored.set_share_regions(current)
                relist.pop(region, None)
                live[region] = restored
                events.append(f"restart {region} snapshot@{step}")
            else:
                if (
                    pending_patch is not None
                    and region == patch_region
                    and not any(
                        _limit(other._whole(key, "s")) == pending_patch
                        for name, other in live.items()
                        if name != region
                    )
                ):
                    # the only node that had the PATCH forgets it (no snapshot): the
                    # old limit is back until every region runs on the new one (a
                    # copy still in flight may bring it back)
                    limits.append((now, old_limit[0], old_limit[1]))
                    events.append(f"patch forgotten@{step}")
                live[region] = fresh(region, True)
                pulled[region] = set()
                events.append(f"restart {region} blind@{step}")
        elif roll < 0.055 and "added" not in live and step < steps // 2:
            # the others list it first (then it starts; docs/sync.md gives the order)
            current.append("added")
            for other in live:
                live[other].set_share_regions(current)
            live["added"] = fresh("added", False)  # not a founder: starts with nothing
            weights["added"] = rng.random()
            events.append(f"add region@{step}")
        elif (roll < 0.057 or step == remove_step) and len(live) > 2 and not removed:
            # a region leaves the list: its node stops, the others drop it from their
            # lists one by one and then hand its rights over (docs/sync.md)
            removed = rng.choice(sorted(live))
            old_list = list(current)
            current.remove(removed)
            # its last round (a gift, maybe) reaches the others late, after they
            # dropped it from their lists: they must not take it (docs/sync.md)
            gone = live[removed]
            gifts += gone.rebalance(now, period_s=step_ns / NS_PER_S, connected=True)
            heirs = [o for o in sorted(live) if o != removed]
            if rng.random() < 0.5:
                # a big last gift (half of what it holds) to one of them
                parts = gone.spendable(key, capacity) // 2
                if parts > 0:
                    gone._ledger(key).give(gone.replica_id, rng.choice(heirs), parts)
                    gone.dirty.add(key)
                    gifts += 1
            last = _batch_encode(gone.collect_deltas())
            for other in heirs:
                if rng.random() < 0.7:
                    seq += 1
                    net.append((now + rng.randint(0, 60) * step_ns, seq, removed, other, last))
            weights = {r: 3.0 for r in heirs}  # the heirs busy: their rights are used
            drain = drain or rng.random() < 0.5
            left[removed] = gone.snapshot()
            del live[removed]
            pulled.pop(removed, None)
            for other in live:
                relist[other] = step + rng.randint(0, 30)
            comeback_step = step + rng.randint(5, 60) if rng.random() < 0.5 else -1
            events.append(f"remove {removed}@{step}")
        elif (
            (roll < 0.062 or step >= comeback_step > 0)
            and removed in left
            and removed not in live
            and not relist
        ):
            # the removed region comes back from its snapshot, on its old list: it
            # pulls one region it can reach before it decides anything
            reachable_now = [o for o in sorted(live) if o in old_list and reachable(removed, o)]
            if reachable_now:
                back = Limiter.restore(
                    left.pop(removed),
                    rules,
                    replica_id=f"{removed}/n/{incarnation[removed] + 1}",
                    regions=len(founders),
                    clock=clock,
                )
                incarnation[removed] += 1
                back.enable_shares(removed, founders)
                back.set_share_regions(old_list)  # its old list: it still counts itself in
                source = live[rng.choice(reachable_now)]
                source.observe_replica(back.replica_id)
                back.merge(_batch_decode(_batch_encode(source.full_state())), now=now)
                live[removed] = back
                weights[removed] = 3.0  # and busy: it must not spend what was handed over
                comeback_step = -1
                events.append(f"{removed} comes back@{step}")
        elif (roll < 0.06 or step == patch_step) and not patched:
            patched = True
            # half of the time the region holding the most (a lowering it can cover)
            region = rng.choice(sorted(live))
            if rng.random() < 0.5:
                region = max(sorted(live), key=lambda r: live[r].spendable(key, 1))
            new_cap = rng.randint(n + 1, 80)
            new_rate = round(10 ** rng.uniform(0.3, 2.0), 2)
            if rng.random() < 0.5:  # a lowering of both, often a small one
                new_cap = max(n + 1, capacity - rng.randint(0, capacity // 2))
                new_rate = round(rate * rng.uniform(0.4, 1.0), 2)
            origin = live[region]
            patch_region = region
            origin.configure(key, capacity=new_cap, refill_rate=new_rate, now=now)
            old_cap, old_int = limits[-1][1], limits[-1][2]
            old_limit = (old_cap, old_int)
            new_int = interval_for(new_rate)
            low = (min(old_cap, new_cap), max(old_int, new_int))
            # the origin burns the excess of a lowering until every region runs on it
            # (core/shares.py burnt_limits): when what it holds above its floor (all a
            # restart without a snapshot may leave it) covers the excess, the lower
            # of the two limits bounds from this instant on; else the old one until
            # every region has cut (a raise always waits: the old, lower one bounds)
            floor = max(origin._floor(old_cap), origin._floor(new_cap))
            held = origin.spendable(key, old_cap) - floor
            covered = burn_covered(low[0], low[1], held, old_cap, old_int)
            # the PATCH's answer (200 in force, 202 pending: api/routes.py) says the
            # same, and the bound checked from here on is the one it announces
            lowering = new_cap < old_cap or new_int > old_int
            pending = origin.pending_lowering(key)
            if lowering and (pending is None) != covered:
                raise Violation(
                    f"seed {seed}: the PATCH would answer {'202' if pending else '200'} "
                    f"but the origin {'covers' if covered else 'does not cover'} the "
                    f"lowering {old_cap}/{old_int}->{new_cap}/{new_int} ({pending})"
                )
            if lowering and pending is None:
                limits.append((now, *low))
                events.append(f"patch covered by {region}")
            else:
                limits.append((now, old_cap, old_int))
            pending_patch = (new_cap, new_int)
            # a raise in either dimension: a region divides the new limit only once
            # every region has reported it
            raises = new_cap > old_cap or new_int < old_int
            events.append(f"patch {old_cap}/{old_int}->{new_cap}/{new_int}@{step}")
            if rng.random() < 0.5:
                # the origin is cut off right after its PATCH and every region is busy:
                # the others spend on the old limit for as long as the cut lasts
                for other in live:
                    if other != region:
                        cut.add(frozenset((region, other)))
                weights = {r: 3.0 for r in live}
                drain = True
                full = old_cap * old_int // step_ns + 1  # steps for an empty bucket to fill
                quiet_until = step + min(full, (steps - step) // 3)
                events.append(f"cut {region} off, all busy after {quiet_until}")
        for other, at in list(relist.items()):
            if at <= step:
                del relist[other]
                if other in live:
                    live[other].set_share_regions(current)
                    events.append(f"{other} drops {removed}@{step}")
        if rng.random() < 0.03:
            hot = rng.choice(sorted(live))
            weights = {r: 0.05 for r in live}
            weights[hot] = 3.0
        # blind regions pull every other region when they can reach it
        for region, got in list(pulled.items()):
            if region not in live:
                continue
            for other in live:
                if other != region and other not in got and reachable(region, other):
                    # the pull request reaches it first: it freezes our older lives' gifts
                    live[other].observe_replica(live[region].replica_id)
                    live[region].merge(
                        _batch_decode(_batch_encode(live[other].full_state())), now=now
                    )
                    got.add(other)
            if got >= set(live) - {region}:
                live[region].shares_pulled()
                del pulled[region]
        # traffic (after a PATCH that cut its origin off: quiet until the buckets are
        # full, then every region drains its bucket one token at a time)
        for region, limiter in live.items():
            if step < quiet_until:
                break
            for _ in range(rng.randint(0, 3) if not drain else 2 * capacity):
                if rng.random() < min(1.0, weights.get(region, 0.1)):
                    tokens = 1 if drain else rng.randint(1, max(1, capacity // 4))
                    asked += tokens
                    try:
                        decision = limiter.acquire(key, tokens, rule="s", now=now)
                    except InvalidTokens:
                        continue
                    if decision.allowed:
                        grants.append((now, tokens))
        if step % rebalance_every == 0:
            for region, limiter in live.items():
                connected = all(reachable(region, o) for o in live if o != region)
                gifts += limiter.rebalance(
                    now, period_s=rebalance_every * step_ns / NS_PER_S, connected=connected
                )
        if step % sync_every == 0:
            for region, limiter in live.items():
                send(region, limiter.collect_deltas())
        # settled: every region runs on the new limit, or one divides it (it has seen
        # every region report it: a region that forgets it later, restarted without a
        # snapshot, divides a lower one)
        if pending_patch is not None and (
            all(
                _limit(limiter._whole(key, "s")) == pending_patch
                or limiter.spendable(key, 1) == 0  # holds nothing: spends nothing
                for limiter in live.values()
            )
            or any(
                raises
                and _limit(limiter._whole(key, "s")) == pending_patch
                and limiter._effective(key, limiter._whole(key, "s")) == pending_patch
                for limiter in live.values()
            )
        ):
            limits.append((now, *pending_patch))
            pending_patch = None
            events.append(f"settled@{step}")
        check(step)
    return Outcome(seed, n, sum(t for _, t in grants), asked, capacity, rate, steps, gifts, events)


def _limit(config: BucketConfig) -> tuple[int, int]:
    return config.capacity, config.interval_ns


def _describe(live: dict[str, Limiter], key: str) -> str:
    out = []
    for region, limiter in sorted(live.items()):
        bucket = limiter.buckets.get(key)
        cfg = bucket.config if bucket is not None else None
        ledger = limiter.ledgers.get(key)
        out.append(
            f"{region}: {cfg and (cfg.capacity, cfg.interval_ns)} "
            f"held {ledger and ledger.holding(region)} blind {limiter.share_blind}"
        )
    return "; ".join(out)


def _refill(limits: list[tuple[int, int, int]], since: int, until: int) -> int:
    """NS_PER_S × the tokens the bound's refill allows over [since, until]."""
    total = 0
    for i, (start, _, interval) in enumerate(limits):
        end = limits[i + 1][0] if i + 1 < len(limits) else until
        lo, hi = max(start, since), min(end, until)
        if hi > lo:
            total += (hi - lo) * NS_PER_S // interval
    return total


def run_many(seeds: range) -> tuple[int, list[str]]:
    """Run ``seeds``; returns (schedules run, violations)."""
    failures = []
    for seed in seeds:
        try:
            run(seed)
        except Violation as error:
            failures.append(str(error))
    return len(seeds), failures

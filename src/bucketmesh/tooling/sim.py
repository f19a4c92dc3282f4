"""The deterministic simulator: many Limiter replicas on a faulty, simulated network.

This module owns the simulation harness of docs/design.md section 12: N replicas
(``r0/n/1`` ...), each on its own skewed simulated clock, exchanging
``DeltaBatch`` messages over a network that drops, duplicates, reorders,
delays and partitions them, driven by one event queue in integer-ns simulated
time (no real clock, no threads, no sockets). A seeded random schedule of
acquires and ``configure`` calls runs on it; a run ends with quiescence (heal,
stop traffic, deliver everything, exchange full state until nothing changes)
and checks the invariants below, raising :class:`InvariantViolation` (naming
the seed) on the first one broken. ``run(seed)`` is one random schedule;
:class:`Simulation` builds hand-written scenarios; ``bucketmesh sim``
runs thousands of seeds (``--expiry``: short ttls and idle gaps, so buckets
expire and are re-created in new epochs; accounting is then per epoch).
Clock offsets are constant per replica, so clocks are monotone and durations
agree; a scenario can also restart a replica from a snapshot.

Generators (``--kind``; by default every seed runs the random schedule and one
of the three case generators):

* ``random`` (and ``expiry``): the general schedule, with busy/quiet partitions
  (issue 23), partitions straddling an epoch boundary (issue 12, case 10) and
  clock jumps;
* ``extreme`` (case 1): limits at the ends of every accepted range, acquires of
  up to 1e12 tokens, PATCHes the limiter must refuse, on a 2027 wall clock;
* ``files`` (case 5): an edited rules file reached by rolling restarts in a
  random order, with and without snapshots, through the node's start-up path
  (``Simulation.reload``);
* ``strict-idle`` (case 11): a PATCHed strict key idle past its ttl in some
  regions, swept, and used again;
* ``retire`` (issue 16): regions restarting under load while a two-look
  reconcile folds retired incarnations away (``RetireSimulation``: its own
  harness and invariants — never a re-grant, never a double count, one entry per
  live replica in the end).

Invariants
----------
* **Join.** After every delivery, a replica's ``used`` entries for a key are
  exactly the maximum of everything delivered to it (and its own entry is
  exactly what it granted): merge loses nothing and invents nothing.
* **Convergence.** After quiescence every replica holds the same state for
  every shared key (``full_state`` compared without the replica id: ``used`` is
  keyed by replica, zero entries dropped), the same rule configs, and answers
  the same ``peek`` at the same true instant.
* **No lost consumption.** For every shared key, Σ used of the converged
  epoch equals the tokens the simulator saw granted in that epoch, entry by
  entry.
* **Local never replicates, strict never over-admits.** No sent batch holds
  a delta of a local bucket, nor a strict one with counters (a strict key's
  per-key config travels alone: epoch 0, no ``used``), and no replica holds
  another's entry for one. Strict mode admits at most ``C + r·D`` in total across replicas
  (D = true time since the key's first grant), whatever the partitions.
* **Wire range** (``extreme``). Every batch, full state and snapshot encodes with
  the real msgpack encoder, every integer in it within int64; a refused PATCH
  (``LimitError``) changes nothing the replica holds.
* **Newest file** (``files``). After quiescence every replica holds the newest
  rules file's limits for each rule (a PATCH of the rule wins over any file), and
  every live bucket of it obeys them. A restart without a snapshot forgets what
  no reachable peer held (counted in ``SimResult.forgotten``, and a PATCH only it
  held may be lost): conservation is then checked down to what survived.
* **Generations keep their debt** (case 10). Where a key's generation was
  replaced by a later one (a partition straddling an epoch boundary), the
  converged TAT is at most C + one slice + one sync round + skew below the GCRA
  (Lindley) TAT of every grant of the key, in any generation.
* **Strict per-key configs** (``strict-idle``, and everywhere). A region never
  holds an older config of a strict key than it held before (a PATCH outlives
  the bucket's expiry); after quiescence every region holds the newest one and
  uses its share, and the shares' capacities sum to at most the patched limit.
* **Admission bound** (shared mode), checked at every grant. Notation: C, T
  are the largest capacity and smallest emission interval (T = 1e9/r ns) any
  config of the key had during the run, v the number of configure calls
  that touched it, Δε the spread of the replicas' clock offsets, t0 the true
  time of the key's first grant in the epoch, G(t) the tokens granted
  everywhere up to true time t, and for the replica e granting at t, U(t) the
  tokens granted elsewhere up to t that had not been delivered to e (measured
  from the messages the simulator delivered, not from e's state)::

      G(t) ≤ C + (t − t0 + Δε·(1 + v)) / T + U(t)                        (A)

  Why. Take a replica's view (config C', T', base B, Σ used S) at its local
  time τ and let Φ(τ) = C' + (τ − B)/T'. Its level is min(C', Φ − S) rounded
  down, and it grants only while the level stays ≥ 0, so after a grant
  S ≤ Φ(τ); by the join invariant S is e's own grants plus what was
  delivered to e, so G(t) = S + U(t). Φ is bounded by the right side of (A)
  minus U: within one config version B only rises (merge takes the max; a
  grant on a full bucket re-bases at τ − S·T' > B), the first base of an
  epoch is set at a first grant, on a clock at most Δε from any other, and
  Φ then grows at 1/T' ≤ 1/T; a config change keeps the level (rounding
  down), and every replica adopting a version proposes its own level-keeping
  base (docs/design.md section 3), so Φ just after it is at most Φ just before it,
  except that the adopter re-bases on its own clock, which can cost Δε/T
  once per version.

  Each replica's own grants also conform to GCRA(C, T) on its own clock,
  i.e. ≤ C + W/T in any window of length W (checked, for keys no configure
  call touched, where it follows from the same argument with B ≥ the base at
  the window's start). The tokens of replica j that e has not received were
  all granted within the last λ_j (j's information lag to e: the age of j's
  oldest grant not yet delivered to e), so they number at most C + λ_j/T,
  which gives the form of docs/design.md section 3::

      G ≤ C + r·D + r·Δε·(1 + v) + Σ_{j≠e} (C + r·λ_j)                    (B)

  where λ_j is at most the one-way delay plus a sync interval when
  connected, plus the repair time of a dropped message, and the partition
  length P for a replica on the other side of a partition: that is the
  (n−1)·(C + r·d) and (k−1)·(C + r·P) of the design, counted per replica.
  (A) is checked exactly (integer ns); (B) is reported as the error budget,
  and ``SimResult.worst_excess`` is the largest fraction of it a schedule used.
  On a lossless network without partitions (or restarts, or expiry) a grant
  reaches every peer within d = sync interval + maximum delay, so (B) holds
  with λ_j ≤ d and is checked in that form, the design's connected bound::

      G ≤ C + r·D + r·Δε·(1 + v) + (n−1)·(C + r·d)                          (C)
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, NoReturn

import msgspec

from bucketmesh.core.bucket import (
    LOCAL,
    NS_PER_S,
    SHARED,
    STRICT,
    Bucket,
    BucketConfig,
    BucketDelta,
    below_watermark,
    incarnation_of,
    interval_for,
    plan_folds,
    slice_ns,
)
from bucketmesh.core.limiter import (
    DeltaBatch,
    InvalidTokens,
    Limiter,
    rule_config,
    rule_digest,
    share_of,
)
from bucketmesh.core.limits import LimitError, check_burst
from bucketmesh.core.rules import Rule
from bucketmesh.core.structs import Snapshot
from bucketmesh.telemetry.log import logger

log = logger("sim")

MS: Final = 1_000_000
#: Simulated true time starts here: far from a multiple of the default ttl, so
#: replicas creating a key agree on its epoch despite clock skew.
START_NS: Final = 1_000 * NS_PER_S + 123 * MS
#: A wall clock of 2027 (about 1.8e18 ns since 1970), where int64 overflow is near:
#: the extreme-limits schedules (issue 12, case 1) run here.
WALL_START_NS: Final = 1_800_000_000 * NS_PER_S + 123 * MS
QUIESCENCE_ROUNDS: Final = 8

_encode = msgspec.msgpack.Encoder().encode
_decode_batch = msgspec.msgpack.Decoder(DeltaBatch).decode
_decode_snapshot = msgspec.msgpack.Decoder(Snapshot).decode


class InvariantViolation(AssertionError):
    """An invariant broken by a schedule; the message names the seed to replay."""

    def __init__(self, seed: int, invariant: str, detail: str, replay: str = "") -> None:
        replay = replay or f"bucketmesh sim --seed {seed}"
        super().__init__(f"seed {seed}: {invariant}: {detail} (replay: {replay})")
        self.seed = seed
        self.invariant = invariant
        self.detail = detail


@dataclass(frozen=True)
class Network:
    """Fault model of every link: delay uniform in [min, max], i.i.d. drops and duplicates."""

    delay_min_ns: int = 1 * MS
    delay_max_ns: int = 20 * MS
    drop: float = 0.0
    duplicate: float = 0.0


@dataclass
class SimResult:
    seed: int
    replicas: int
    keys: int
    acquires: int = 0
    granted: int = 0
    denied: int = 0
    messages: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    partitions: int = 0
    configures: int = 0
    #: configure calls the limiter refused (LimitError): state checked untouched
    refused: int = 0
    #: replicas restarted (with the rules file of that moment, with or without snapshot)
    restarts: int = 0
    #: restarts from the write-ahead log alone (kill -9 before the first snapshot)
    log_restarts: int = 0
    #: tokens a restart without a snapshot forgot (no reachable peer had heard of them)
    forgotten: int = 0
    max_lag_ns: int = 0
    #: entries of retired incarnations folded away (``retire`` schedules)
    folded: int = 0
    #: tokens a replica carried from a replaced generation into the next (not grants)
    carried: int = 0
    #: the most tokens granted beyond C + r·D at any grant (over-admission, in tokens)
    excess_tokens: float = 0.0
    #: the largest G / (C + r·D) seen: how far admission went beyond one bucket's worth
    worst_ratio: float = 0.0
    #: the largest (G − (C + r·D)) / (bound B − (C + r·D)): share of the error budget used
    worst_excess: float = 0.0
    events: int = 0
    #: buckets a deferred rule change moved after the change (``Limiter.adopt_pending``)
    late_adoptions: int = 0


class _Limits:
    """The loosest limits a key had during the run (what the bounds are computed with),
    and for strict keys every grant, whatever the granting replica's epoch."""

    __slots__ = (
        "capacity",
        "changes",
        "first_ns",
        "granted",
        "interval_ns",
        "longest_ns",
        "mode",
        "slice_ns",
    )

    def __init__(self, config: BucketConfig) -> None:
        self.mode = config.mode
        self.capacity = config.capacity
        self.interval_ns = config.interval_ns
        self.longest_ns = config.interval_ns
        self.slice_ns = slice_ns(config)
        self.changes = 0
        self.granted = 0
        self.first_ns = 0


class _Ledger:
    """What the simulator saw granted for one (key, epoch)."""

    __slots__ = ("arrivals", "conform", "epoch", "first_ns", "granted", "log", "own", "peak")

    def __init__(self, first_ns: int, epoch: int = 0) -> None:
        self.first_ns = first_ns
        self.epoch = epoch
        self.granted = 0
        # every grant anywhere as (granting replica's local time, sequence, tokens), sorted:
        # the merged arrival sequence whose GCRA (Lindley) TAT no view may exceed
        self.arrivals: list[tuple[int, int, int]] = []
        self.peak: int | None = None  # max_i (τ_i − T·tokens before τ_i), None: stale
        self.own: dict[str, int] = {}
        # rid -> (true times, cumulative own grants) for information lags
        self.log: dict[str, tuple[list[int], list[int]]] = {}
        # rid -> TAT of the GCRA(C, T) its own grant stream must conform to
        self.conform: dict[str, int] = {}


Knowledge = dict[tuple[str, int], dict[str, int]]


class Simulation:
    """N Limiter replicas, simulated clocks and network, one event queue.

    Build a scenario by scheduling ``acquire``, ``configure``, ``partition`` and
    ``at`` (any callable) events, then ``run(until)``, ``quiesce()`` and
    ``check()``. ``keys`` maps each bucket key to the name of its rule. Random
    choices (clock offsets when ``skews_ns`` is None, network faults, which peer
    gets anti-entropy) come from ``seed`` alone.
    """

    def __init__(
        self,
        seed: int,
        replicas: int,
        rules: Sequence[Rule],
        keys: Mapping[str, str],
        *,
        skews_ns: Sequence[int] | None = None,
        max_skew_ns: int = 5 * MS,
        network: Network | None = None,
        sync_interval_ns: int = 20 * MS,
        anti_entropy_interval_ns: int = 100 * MS,
        expire_interval_ns: int | None = None,
        start_ns: int = START_NS,
        record: bool = False,
    ) -> None:
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.seed = seed
        #: how to reproduce this run, for violation messages
        self.replay = f"Simulation(seed={seed}, ...)"
        self.rng = random.Random(seed)
        #: how many dirty keys a sync tick collects (None: all), drawn per tick from a
        #: stream of its own, so the schedules of the main stream stay what they were:
        #: a collector takes a large dirty set in slices (Mesh.collect_sliced), and keys
        #: left dirty for the next tick must converge all the same
        self.slices = random.Random(f"collect-{seed}")
        #: whether each replica adopts rule changes in slices (a serving node's
        #: ``Limiter.defer_adoption_above``), and the slices' sizes and delays: a stream
        #: of its own too. A bucket not moved yet decides on its previous config.
        self.adoption = random.Random(f"adopt-{seed}")
        self.deferring = [self.adoption.random() < 0.5 for _ in range(replicas)]
        self.n = replicas
        self.rules = list(rules)
        #: the rules file each replica runs with (``reload`` gives one a new file)
        self.replica_rules = [self.rules] * replicas
        self.rule_of = dict(keys)
        self.network = network or Network()
        self.sync_interval_ns = sync_interval_ns
        self.anti_entropy_interval_ns = anti_entropy_interval_ns
        self.expire_interval_ns = expire_interval_ns
        if skews_ns is None:
            skews_ns = [self.rng.randint(-max_skew_ns, max_skew_ns) for _ in range(replicas)]
        if len(skews_ns) != replicas:
            raise ValueError("one clock offset per replica")
        self.skews = list(skews_ns)
        self.skew_spread = max(self.skews) - min(self.skews)
        self.jumped_ns = 0  # Σ |clock jumps| so far
        # every grant reaches every peer within this, while nothing is lost (bound C)
        self.lossless = not self.network.drop and not expire_interval_ns
        self.now = start_ns
        self.start_ns = start_ns
        self.incarnations = [1] * replicas
        self.limiters = [self._limiter(i, f"r{i}/n/1") for i in range(replicas)]
        by_name = {rule.name: rule for rule in self.rules}
        self.limits = {
            key: _Limits(rule_config(by_name[name])) for key, name in self.rule_of.items()
        }
        self.keys_of_rule: dict[str, list[str]] = {}
        for key, name in self.rule_of.items():
            self.keys_of_rule.setdefault(name, []).append(key)
        self.ledgers: dict[tuple[str, int], _Ledger] = {}
        self.knowledge: list[Knowledge] = [{} for _ in range(replicas)]
        self.partitions: list[tuple[int, ...]] = []  # active: replica -> group
        self.queue: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = 0
        self.ticking = True
        self.healed = False
        self.sent_seq = 0
        self.last_delivered: dict[tuple[int, int], int] = {}
        self.result = SimResult(seed, replicas, len(self.rule_of))
        #: check every integer shipped is within int64 (extreme-limits schedules)
        self.check_int64 = False
        #: every config a ``configure`` event created, in order
        self.configs: list[BucketConfig] = []
        #: (target, config) of every configure event the limiter accepted
        self.configured: list[tuple[str, BucketConfig]] = []
        #: rule name -> the newest rules file's Rule, once ``reload`` gave one (case 5)
        self.newest_file: dict[str, Rule] = {}
        #: (key, epoch, replica id) -> the least of its count any replica still held when
        #: a restart without a snapshot lost the rest (``_forget``)
        self.forgotten: dict[tuple[str, int, str], int] = {}
        #: versions of PATCHes no replica but one restarted without a snapshot held
        self.lost_configs: set[tuple[int, str]] = set()
        #: key -> every grant of it, any generation, as (granting replica's clock, tokens)
        self.key_arrivals: dict[str, list[tuple[int, int]]] = {}
        #: (replica, key) -> the newest config version the replica held for a strict key
        self.strict_seen: dict[tuple[int, str], tuple[int, str]] = {}
        #: with ``record``: every message delivered, as (destination, msgpack bytes)
        self.delivered: list[tuple[int, bytes]] | None = [] if record else None
        for i in range(replicas):
            offset = self.rng.randrange(max(1, sync_interval_ns))
            self._push(start_ns + offset, self._on_sync, (i,))
            offset = self.rng.randrange(max(1, anti_entropy_interval_ns))
            self._push(start_ns + offset, self._on_anti_entropy, (i,))
            if expire_interval_ns:
                self._push(start_ns + expire_interval_ns, self._on_expire, (i,))

    def _limiter(self, i: int, replica_id: str) -> Limiter:
        limiter = Limiter(
            self.replica_rules[i],
            replica_id=replica_id,
            clock=lambda: self.now + self.skews[i],
            regions=self.n,
        )
        self._defer(i, limiter)
        return limiter

    def _defer(self, i: int, limiter: Limiter) -> None:
        if self.deferring[i]:
            limiter.defer_adoption_above = 0
            limiter.on_adoption = partial(self._adopt_later, i)

    def _adopt_later(self, i: int) -> None:
        self._push(self.now + self.adoption.randint(0, 5 * MS), self._on_adopt, (i,))

    def _on_adopt(self, i: int) -> None:
        """A slice of ``i``'s deferred rule changes (node/serve.py's adoption loop)."""
        limiter = self.limiters[i]
        before = {key: bucket.config.version for key, bucket in limiter.buckets.items()}
        done = limiter.adopt_pending(self.adoption.randint(1, 3))
        self.result.late_adoptions += sum(
            before.get(key) != bucket.config.version for key, bucket in limiter.buckets.items()
        )
        if not done:
            self._adopt_later(i)

    # -- scheduling ------------------------------------------------------------

    def _push(self, at: int, handler: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, handler, args))

    def acquire(self, at: int, replica: int, key: str, tokens: int = 1) -> None:
        """A client asks ``replica`` for ``tokens`` of ``key`` at true time ``at``."""
        self._push(at, self._on_acquire, (replica, key, tokens))

    def configure(
        self,
        at: int,
        replica: int,
        target: str,
        *,
        capacity: int | None = None,
        refill_rate: float | None = None,
        shadow: bool | None = None,
    ) -> None:
        """``replica`` changes a rule's (or one key's) limits, or its shadow mark, at true
        time ``at`` (a change of the mark alone is adopted as any other: a new base
        keeping the level, so it counts as a config change for the bounds)."""
        touched = self.keys_of_rule.get(target, [target] if target in self.rule_of else [])
        for key in touched:
            limits = self.limits[key]
            limits.changes += 1
            if capacity is not None:
                limits.capacity = max(limits.capacity, capacity)
            if refill_rate is not None:
                limits.interval_ns = min(limits.interval_ns, interval_for(refill_rate))
                limits.longest_ns = max(limits.longest_ns, interval_for(refill_rate))
            span = limits.capacity * limits.longest_ns // 8
            limits.slice_ns = max(limits.slice_ns, span)
        self.result.configures += 1
        self._push(at, self._on_configure, (replica, target, capacity, refill_rate, shadow))

    def jump(self, at: int, replica: int, offset_ns: int) -> None:
        """``replica``'s clock jumps by ``offset_ns`` at true time ``at`` (NTP stepping it,
        a VM resumed); a later jump back by the opposite amount is the correction."""
        self._push(at, self._on_jump, (replica, offset_ns))

    def _on_jump(self, replica: int, offset_ns: int) -> None:
        self.skews[replica] += offset_ns
        # refill follows each replica's clock: every bound below widens by the jumps
        self.jumped_ns += abs(offset_ns)
        spread = max(self.skews) - min(self.skews)
        if spread > self.skew_spread:
            self.skew_spread = spread

    def partition(self, start: int, end: int, groups: Sequence[Sequence[int]]) -> None:
        """Cut the network into ``groups`` (replica indexes) from ``start`` to ``end``."""
        group_of = [-1] * self.n
        for number, group in enumerate(groups):
            for replica in group:
                group_of[replica] = number
        if -1 in group_of:
            raise ValueError("every replica must be in a group")
        self.result.partitions += 1
        self.lossless = False
        self._push(start, self._on_partition, (tuple(group_of),))
        self._push(end, self._on_heal, (tuple(group_of),))

    def at(self, when: int, action: Callable[[Simulation], None]) -> None:
        """Run ``action(self)`` at true time ``when`` (restarts, probes, ...)."""
        self._push(when, action, (self,))

    def local_time(self, replica: int) -> int:
        return self.now + self.skews[replica]

    def restart(
        self, replica: int, snapshot: bytes | None, *, new_incarnation: bool = True
    ) -> None:
        """Replace ``replica``'s process now: restored from ``snapshot`` (or empty), under
        the next incarnation id unless ``new_incarnation`` is False (the hazard of
        docs/design.md section 6, which the join check must catch). Messages in flight to
        the old process reach the new one; the old one's dirty set is lost."""
        old = self.limiters[replica].replica_id
        self.lossless = False
        if new_incarnation:
            self.incarnations[replica] += 1
        replica_id = f"r{replica}/n/{self.incarnations[replica]}"
        clock = self.limiters[replica].clock
        if snapshot is None:
            limiter = self._limiter(replica, replica_id)
        else:
            limiter = Limiter.restore(
                snapshot,
                self.replica_rules[replica],
                replica_id=replica_id,
                clock=clock,
                regions=self.n,
            )
            # as storage/memory.py restores: buckets a deferred rule change had not
            # moved yet when the snapshot was taken are moved now
            limiter.stamp_file_rules(clock())
            self._defer(replica, limiter)
        self.limiters[replica] = limiter
        known: Knowledge = {}
        for key, bucket in limiter.buckets.items():
            if bucket.config.mode == SHARED:
                # heard values are non-zero (a snapshot may hold a peer's zero entry)
                used = {rid: n for rid, n in bucket.used(replica_id).items() if n}
                if replica_id == old:
                    used.pop(replica_id, None)
                known[(key, bucket.epoch)] = used
        self.knowledge[replica] = known
        if snapshot is None:
            for key in self.rule_of:
                self.strict_seen.pop((replica, key), None)

    def reload(
        self,
        at: int,
        replica: int,
        rules: Sequence[Rule],
        *,
        snapshot: bool,
        log_only: bool = False,
    ) -> None:
        """At true time ``at``, ``replica`` is restarted (SIGTERM, then a new process)
        with the rules file ``rules``: its last deltas are pushed, then the new process
        resumes its snapshot or starts empty, and follows the node's start-up path
        (``log_only``: kill -9 before the node's first snapshot: nothing is pushed, and
        the new process replays its write-ahead log, which holds the state but not the
        snapshot's record of the file versions this node loaded)
        (storage/memory.py, node/serve.py): ``stamp_file_rules``, ``rescale_shares``;
        without a snapshot ``begin_recovery`` and the start-up pull from every peer
        it can reach. The invariant (checked by ``check``): after quiescence every
        replica holds the newest file's limits for each rule, unless a PATCH of the
        rule is newer, and its live buckets obey them."""
        for rule in rules:
            limits = self._limits_of_rule(rule.name)
            for key_limits in limits:
                key_limits.changes += 1
                key_limits.capacity = max(key_limits.capacity, rule.capacity)
                interval = interval_for(rule.refill_rate)
                key_limits.interval_ns = min(key_limits.interval_ns, interval)
                key_limits.longest_ns = max(key_limits.longest_ns, interval)
                span = key_limits.capacity * key_limits.longest_ns // 8
                key_limits.slice_ns = max(key_limits.slice_ns, span)
        self._push(at, self._on_reload, (replica, tuple(rules), snapshot, log_only))

    def _forget(self, replica: int) -> None:
        """A restart without a snapshot: what the old process knew and no other replica
        holds is gone (a peer cut off from it never heard of it). Conservation then holds
        only down to what survives elsewhere (docs/storage.md: a restart without a
        snapshot); recorded as floors per (key, epoch, replica id)."""
        old = self.limiters[replica]
        for target, config in self.configured:
            held_elsewhere = False
            for peer, limiter in enumerate(self.limiters):
                if peer == replica:
                    continue
                known = [limiter.rule_configs.get(target), limiter.key_configs.get(target)]
                bucket = limiter.buckets.get(target)
                known.append(bucket.config if bucket is not None else None)
                if any(c is not None and c.version >= config.version for c in known):
                    held_elsewhere = True
            if not held_elsewhere:
                self.lost_configs.add(config.version)
        for key, bucket in old.buckets.items():
            if bucket.config.mode != SHARED:
                continue
            for rid, value in bucket.used(old.replica_id).items():
                best = 0
                for peer, limiter in enumerate(self.limiters):
                    held = limiter.buckets.get(key) if peer != replica else None
                    if held is not None and held.epoch == bucket.epoch:
                        best = max(best, held.used(limiter.replica_id).get(rid, 0))
                if best < value:
                    slot = (key, bucket.epoch, rid)
                    floor = self.forgotten.get(slot)
                    self.forgotten[slot] = best if floor is None else min(floor, best)

    def _limits_of_rule(self, name: str) -> list[_Limits]:
        return [self.limits[key] for key in self.keys_of_rule.get(name, [])]

    def _on_reload(
        self, replica: int, rules: tuple[Rule, ...], snapshot: bool, log_only: bool = False
    ) -> None:
        old = self.limiters[replica]
        self.result.restarts += 1
        if not log_only:
            # SIGTERM: the node flushes what no peer acknowledged yet to the peers it
            # can reach (the mesh's outbox keeps a delta until acknowledged: its full
            # state here, since the simulated network forgets what it drops)
            final = old.collect_deltas()
            full = old.full_state()
            full.rules.update(final.rules)
            data = self._encodable(replica, "full state", lambda: _encode(full))
            for peer in range(self.n):
                if peer != replica and not self._cut(peer, replica):
                    self.sent_seq += 1
                    self._deliver(peer, replica, data, self.sent_seq)
        if not snapshot:
            self._forget(replica)
        saved = self._encodable(replica, "snapshot", old.snapshot) if snapshot else None
        restored: dict[str, BucketConfig] = {}
        if saved is not None and log_only:
            self.result.log_restarts += 1
            image = _decode_snapshot(saved)
            saved = _encode(msgspec.structs.replace(image, files={}))
            restored = image.rules
        before = {rule.name: rule_digest(rule) for rule in self.replica_rules[replica]}
        self.replica_rules[replica] = list(rules)
        self.restart(replica, saved)
        limiter = self.limiters[replica]
        local = self.local_time(replica)
        limiter.stamp_file_rules(local)
        limiter.rescale_shares(local)
        for rule in rules:
            # a restart from the log alone with the limits this node ran, whose config
            # in effect is a load of those limits, keeps it (no adoption anywhere)
            config = restored.get(rule.name)
            digest = rule_digest(rule)
            if (
                config is not None
                and before.get(rule.name) == digest
                and config.version[0] == 0
                and config.version[1].endswith(":" + digest)
                and ":" + "0" * 20 + ":" not in config.version[1]
                and limiter.rule_configs[rule.name] != config
            ):
                self._fail(
                    "a restart with unchanged limits keeps their version",
                    f"r{replica} restarted from its log with rule {rule.name!r} unchanged: "
                    f"{config.version} became {limiter.rule_configs[rule.name].version}",
                )
        if saved is None:
            limiter.begin_recovery(local, shared=True)
        pulled = False
        for peer in range(self.n):
            if peer != replica and not self._cut(peer, replica):
                pulled = True
                self.sent_seq += 1
                state = self.limiters[peer].full_state()
                data = self._encodable(peer, "full state", partial(_encode, state))
                self._deliver(replica, peer, data, self.sent_seq)
        if saved is None and pulled:
            limiter.end_shared_recovery()

    # -- running -----------------------------------------------------------------

    def run(self, until: int) -> None:
        """Process every event up to true time ``until`` (inclusive)."""
        queue = self.queue
        pop = heapq.heappop
        while queue and queue[0][0] <= until:
            at, _, handler, args = pop(queue)
            self.now = at
            self.result.events += 1
            handler(*args)
        if self.now < until:
            self.now = until

    def quiesce(self) -> None:
        """Heal, stop traffic, faults and periodic sync, deliver what is in flight, then
        exchange full state (no loss) until a round changes nothing."""
        self._check_join_all()
        self.healed = True
        self.partitions.clear()
        self.network = Network(self.network.delay_min_ns, self.network.delay_max_ns)
        self.ticking = False
        traffic = (self._on_acquire, self._on_configure)
        self.queue = [event for event in self.queue if event[2] not in traffic]
        heapq.heapify(self.queue)
        while self.queue:
            self.run(self.queue[0][0])
        for _ in range(QUIESCENCE_ROUNDS):
            self.now += 1 * MS
            changed = 0
            # deferred rule adoptions go on (a node's adoption loop): their slices
            while self.queue:
                self.run(self.queue[0][0])
            for i, limiter in enumerate(self.limiters):
                deltas = limiter.collect_deltas()
                full = limiter.full_state()
                changed += len(deltas.deltas) + len(deltas.rules)
                for j in range(self.n):
                    if j != i:
                        for batch in (deltas, full):
                            data = self._encodable(i, "batch", partial(_encode, batch))
                            changed += self._deliver(j, i, data, self.sent_seq)
            # adopting a newer rule config is not counted by merge(): it shows as dirty
            if not changed and not any(
                lim.dirty or lim.dirty_rules or lim.adoption_pending() for lim in self.limiters
            ):
                self._check_join_all()
                return
        self._fail("convergence", f"still changing after {QUIESCENCE_ROUNDS} rounds")

    # -- event handlers ------------------------------------------------------------

    def _on_acquire(self, i: int, key: str, tokens: int) -> None:
        limiter = self.limiters[i]
        local = self.now + self.skews[i]
        result = self.result
        try:
            decision = limiter.acquire(key, tokens, rule=self.rule_of[key], now=local)
        except InvalidTokens:
            return
        result.acquires += 1
        if not decision.allowed:
            result.denied += 1
            self._check_denial(i, key, tokens, local)
            return
        if not tokens:
            return
        result.granted += tokens
        self.key_arrivals.setdefault(key, []).append((local, tokens))
        bucket = limiter.buckets[key]
        rid = limiter.replica_id
        ledger = self.ledgers.get((key, bucket.epoch))
        if ledger is None:
            ledger = self.ledgers[(key, bucket.epoch)] = _Ledger(self.now, bucket.epoch)
        ledger.granted += tokens
        self.seq += 1
        insort(ledger.arrivals, (local, self.seq, tokens))
        ledger.peak = None
        own = ledger.own[rid] = ledger.own.get(rid, 0) + tokens
        times, cumulative = ledger.log.setdefault(rid, ([], []))
        times.append(self.now)
        cumulative.append(own)
        if bucket.mine != own:
            self._fail(
                "no lost consumption",
                f"{rid} granted {own} tokens of {key!r} in epoch {bucket.epoch} "
                f"but its own entry says {bucket.mine}",
            )
        limits = self.limits[key]
        interval = limits.interval_ns
        capacity_ns = limits.capacity * interval
        if limits.mode == STRICT:
            self._observe_strict(i, key)
            if not limits.granted:
                limits.first_ns = self.now
            limits.granted += tokens
            elapsed = self.now - limits.first_ns + self.jumped_ns * self.n
            if limits.granted * interval > capacity_ns + elapsed:
                self._fail(
                    "strict mode never over-admits",
                    f"{limits.granted} tokens of {key!r} granted within "
                    f"{(self.now - limits.first_ns) / NS_PER_S:.6f}s "
                    f"(C={limits.capacity}, T={interval}ns)",
                )
            share_interval = interval * self.n
            self._check_conformance(
                ledger,
                rid,
                key,
                local,
                tokens,
                limits.capacity // self.n,
                share_interval,
                self.jumped_ns,
            )
            return
        if limits.mode == LOCAL:
            self._check_conformance(
                ledger, rid, key, local, tokens, limits.capacity, interval, self.jumped_ns
            )
            return
        if not limits.changes:
            # a view resolves even this replica's own older grants to slice starts
            self._check_conformance(
                ledger,
                rid,
                key,
                local,
                tokens,
                limits.capacity,
                interval,
                limits.slice_ns + self.jumped_ns,
            )
        self._check_bound(i, rid, key, bucket.epoch, ledger, limits)

    def _check_denial(self, i: int, key: str, tokens: int, local: int) -> None:
        """No under-admission: a denial must be justified by the real history.

        The merged TAT of any view is at most the GCRA (Lindley) TAT of the merged
        arrival sequence of every grant made anywhere so far, stamped with the
        granting replica's clock (docs/design.md section 3, "History"): a view can
        only be missing grants or resolve them to an earlier point, never charge one
        twice or against refill that paid for it. So a request the exact merged
        bucket would grant must not be denied. Checked for shared keys whose
        config never changed, without expiry (a tombstone's count is charged
        conservatively) — where the bound is exact, with no allowance.
        """
        limits = self.limits[key]
        if limits.mode != SHARED or limits.changes or self.expire_interval_ns:
            return
        bucket = self.limiters[i].buckets.get(key)
        if bucket is None:
            return
        ledger = self.ledgers.get((key, bucket.epoch))
        interval = bucket.config.interval_ns
        total = sum(ledger.own.values()) if ledger else 0  # grants and carried charges
        tat = bucket.epoch + total * interval
        if ledger is not None and ledger.arrivals:
            peak = ledger.peak
            if peak is None:
                before = 0
                for stamp, _, n in ledger.arrivals:
                    term = stamp - before * interval
                    if peak is None or term > peak:
                        peak = term
                    before += n
                ledger.peak = peak
            assert peak is not None
            if peak + total * interval > tat:
                tat = peak + total * interval
        backlog = tat - local + self.jumped_ns
        if (backlog if backlog > 0 else 0) + tokens * interval <= bucket.config.capacity * interval:
            view = bucket.tat() - local
            self._fail(
                "no under-admission",
                f"r{i} denied {tokens} of {key!r} at local {local} (its TAT is {view}ns "
                f"ahead) but every grant made anywhere leaves a GCRA TAT only {backlog}ns "
                f"ahead (C={bucket.config.capacity}, T={interval}ns, {total} granted)",
            )

    def _check_conformance(
        self,
        ledger: _Ledger,
        rid: str,
        key: str,
        local: int,
        tokens: int,
        capacity: int,
        interval: int,
        slack_ns: int = 0,
    ) -> None:
        tat = ledger.conform.get(rid, local)
        tat = (tat if tat > local else local) + tokens * interval
        ledger.conform[rid] = tat
        if tat - local > capacity * interval + slack_ns:
            self._fail(
                "one replica never admits more than one bucket's worth",
                f"{rid}'s own grants of {key!r} do not conform to GCRA(C={capacity}, "
                f"T={interval}ns): {tat - local - capacity * interval}ns over at local {local}",
            )

    def _check_bound(
        self, i: int, rid: str, key: str, epoch: int, ledger: _Ledger, limits: _Limits
    ) -> None:
        now = self.now
        interval = limits.interval_ns
        capacity_ns = limits.capacity * interval
        known = self.knowledge[i].get((key, epoch), {})
        unknown = 0
        budget_ns = 0
        for other, own in ledger.own.items():
            if other == rid:
                continue
            heard = known.get(other, 0)
            if own > heard:
                unknown += own - heard
                times, cumulative = ledger.log[other]
                lag = now - times[bisect_right(cumulative, heard)]
                budget_ns += capacity_ns + lag
                if lag > self.result.max_lag_ns:
                    self.result.max_lag_ns = lag
        ideal_ns = capacity_ns + (now - ledger.first_ns)
        # the views resolve others' grants to slice starts: up to one slice S of refill
        skew_ns = (
            self.skew_spread * (1 + limits.changes) + limits.slice_ns + self.jumped_ns * self.n
        )
        granted_ns = ledger.granted * interval
        if granted_ns > ideal_ns + skew_ns + unknown * interval:
            self._fail(
                "admission bound",
                f"{ledger.granted} tokens of {key!r} granted by true time {now} "
                f"(first grant at {ledger.first_ns}, C={limits.capacity}, T={interval}ns, "
                f"skew spread {self.skew_spread}ns, {limits.changes} config changes, "
                f"{unknown} granted elsewhere not yet delivered to {rid}): bound (A) is "
                f"{(ideal_ns + skew_ns + unknown * interval) / interval:.3f}",
            )
        result = self.result
        excess = (granted_ns - ideal_ns) / interval
        if excess > result.excess_tokens:
            result.excess_tokens = excess
        ratio = granted_ns / ideal_ns
        if ratio > result.worst_ratio:
            result.worst_ratio = ratio
        if self.lossless:
            reach_ns = self.sync_interval_ns + self.network.delay_max_ns
            connected_ns = ideal_ns + skew_ns + (self.n - 1) * (capacity_ns + reach_ns)
            if granted_ns > connected_ns:
                self._fail(
                    "admission bound, connected",
                    f"{ledger.granted} tokens of {key!r} granted by true time {now} on a "
                    f"lossless network (d = {reach_ns}ns): bound (C) is "
                    f"{connected_ns / interval:.3f}",
                )
        allowance = skew_ns + budget_ns
        if granted_ns > ideal_ns and allowance:
            excess = (granted_ns - ideal_ns) / allowance
            if excess > result.worst_excess:
                result.worst_excess = excess

    def _on_configure(
        self,
        i: int,
        target: str,
        capacity: int | None,
        refill_rate: float | None,
        shadow: bool | None = None,
    ) -> None:
        limiter = self.limiters[i]
        before = _state_of(limiter)
        try:
            config = limiter.configure(
                target,
                capacity=capacity,
                refill_rate=refill_rate,
                now=self.now + self.skews[i],
                shadow=shadow,
            )
        except LimitError as error:
            # refused (a 400 naming the field): nothing this replica holds may change
            self.result.refused += 1
            after = _state_of(limiter)
            changed = _changed_state(before, after)
            if changed:
                self._fail(
                    "a refused PATCH leaves the state untouched",
                    f"r{i} refused capacity={capacity} refillRate={refill_rate} of "
                    f"{target!r} ({error}) but changed {changed}",
                )
            return
        self.configs.append(config)
        self.configured.append((target, config))
        if self.check_int64:
            self._encodable(i, "snapshot", lambda: limiter.snapshot())
        if target in self.rule_of:
            self._observe_strict(i, target)

    def _encodable(self, i: int, what: str, encode: Callable[[], bytes]) -> bytes:
        """``encode()``, checked: the real msgpack encoder takes it, and (extreme
        schedules) every integer in it is within int64, the wire format's range."""
        try:
            data = encode()
        except (OverflowError, msgspec.EncodeError) as error:
            self._fail("every delta encodes", f"r{i}'s {what} cannot be encoded: {error}")
        if self.check_int64:
            outside = _outside_int64(msgspec.msgpack.decode(data))
            if outside is not None:
                self._fail(
                    "every delta encodes",
                    f"r{i}'s {what} holds {outside}, outside int64 (the wire format)",
                )
        return data

    def _observe_strict(self, i: int, key: str) -> None:
        """Issue 12, case 11: a region never goes back to an older config of a strict
        key once it held a newer one (a per-key PATCH outlives the bucket's expiry)."""
        limiter = self.limiters[i]
        bucket = limiter.buckets.get(key)
        whole = limiter.key_configs.get(key)
        if (bucket is None or bucket.config.mode != STRICT) and whole is None:
            return
        seen = self.strict_seen.get((i, key))
        held = bucket.config.version if bucket is not None else None
        if bucket is not None and seen is not None and held is not None and held < seen:
            self._fail(
                "a strict key's per-key config outlives its bucket",
                f"{limiter.replica_id} holds {key!r} under config {held} (capacity "
                f"{bucket.config.capacity}) after it had held the newer {seen}",
            )
        for version in (held, whole.version if whole is not None else None):
            if version is not None and (seen is None or version > seen):
                seen = version
        if seen is not None:
            self.strict_seen[(i, key)] = seen

    def _on_sync(self, i: int) -> None:
        if not self.ticking:
            return
        batch = self.limiters[i].collect_deltas(self.slices.choice((None, None, 1, 2)))
        if batch.deltas or batch.rules:
            self._broadcast(i, batch, range(self.n))
        self._push(self.now + self.sync_interval_ns, self._on_sync, (i,))

    def _on_anti_entropy(self, i: int) -> None:
        if not self.ticking:
            return
        if self.n > 1:
            peer = self.rng.randrange(self.n - 1)
            peer += peer >= i
            self._broadcast(i, self.limiters[i].full_state(), (peer,))
        self._push(self.now + self.anti_entropy_interval_ns, self._on_anti_entropy, (i,))

    def _on_expire(self, i: int) -> None:
        if not self.ticking:
            return
        self.expire(i)
        assert self.expire_interval_ns is not None
        self._push(self.now + self.expire_interval_ns, self._on_expire, (i,))

    def expire(self, replica: int) -> int:
        """``replica`` sweeps its idle buckets now; returns how many went."""
        limiter = self.limiters[replica]
        now = self.now + self.skews[replica]
        dying = [key for key, bucket in limiter.buckets.items() if bucket.expired(now)]
        epochs = {key: limiter.buckets[key].epoch for key in dying}
        dropped = limiter.expire(now)
        for key, epoch in epochs.items():
            # dropping a full bucket forgets its entries: so must the join check
            self.knowledge[replica].pop((key, epoch), None)
        return dropped

    def inject(self, replica: int, batch: DeltaBatch) -> int:
        """Deliver ``batch`` to ``replica`` now, as if from nowhere; returns merge()'s count."""
        return self._deliver(replica, -1, _encode(batch), self.sent_seq)

    def _on_partition(self, group_of: tuple[int, ...]) -> None:
        if not self.healed:
            self.partitions.append(group_of)

    def _on_heal(self, group_of: tuple[int, ...]) -> None:
        if group_of in self.partitions:
            self.partitions.remove(group_of)

    def _cut(self, a: int, b: int) -> bool:
        if not self.partitions:
            return False
        return any(group_of[a] != group_of[b] for group_of in self.partitions)

    # -- the network -----------------------------------------------------------------

    def _broadcast(self, src: int, batch: DeltaBatch, peers: Sequence[int] | range) -> None:
        for delta in batch.deltas:
            config_only = delta.config.mode != SHARED and not delta.used and not delta.epoch
            if delta.config.mode != SHARED and not config_only:
                self._fail(
                    "local and strict buckets never replicate",
                    f"r{src} sent a {delta.config.mode} delta of {delta.key!r}",
                )
        data = self._encodable(src, "batch", lambda: _encode(batch))
        network = self.network
        rng = self.rng
        result = self.result
        for dst in peers:
            if dst == src:
                continue
            result.messages += 1
            self.sent_seq += 1
            if self._cut(src, dst) or (network.drop and rng.random() < network.drop):
                result.dropped += 1
                continue
            copies = 2 if network.duplicate and rng.random() < network.duplicate else 1
            result.duplicated += copies - 1
            for _ in range(copies):
                delay = rng.randint(network.delay_min_ns, network.delay_max_ns)
                self._push(self.now + delay, self._on_deliver, (dst, src, data, self.sent_seq))

    def _on_deliver(self, dst: int, src: int, data: bytes, sent: int) -> None:
        if self._cut(src, dst):
            self.result.dropped += 1
            return
        self._deliver(dst, src, data, sent)

    def _deliver(self, dst: int, src: int, data: bytes, sent: int) -> int:
        last = self.last_delivered.get((src, dst), 0)
        if sent < last:
            self.result.reordered += 1
        else:
            self.last_delivered[(src, dst)] = sent
        if self.delivered is not None:
            self.delivered.append((dst, data))
        batch = _decode_batch(data)
        limiter = self.limiters[dst]
        buckets = limiter.buckets
        epochs = [
            None if bucket is None else bucket.epoch
            for bucket in (buckets.get(delta.key) for delta in batch.deltas)
        ]
        local = self.now + self.skews[dst]
        changed = limiter.merge(batch, now=local)
        known = self.knowledge[dst]
        me = limiter.replica_id
        for delta, epoch in zip(batch.deltas, epochs, strict=True):
            if delta.config.mode == STRICT and delta.key in self.rule_of:
                self._observe_strict(dst, delta.key)
            bucket = buckets.get(delta.key)
            if bucket is None or bucket.epoch != delta.epoch:
                continue  # a stale generation, ignored
            if epoch is not None and epoch < delta.epoch:
                # a later generation replaced ours: we carried our share of its backlog
                carried = bucket.mine - delta.used.get(me, 0)
                if carried > 0:
                    self._charge(delta.key, bucket.epoch, me, bucket.epoch + 1, carried)
            if epoch != delta.epoch:
                # (re)created from this delta: whatever it knew of the key is gone
                if epoch is not None:
                    known.pop((delta.key, epoch), None)
                known[(delta.key, delta.epoch)] = {}
            entry = known.setdefault((delta.key, delta.epoch), {})
            for rid, value in delta.used.items():
                if value > entry.get(rid, 0):
                    entry[rid] = value
            self._check_join(dst, delta.key, delta.used)
        return changed

    def _charge(self, key: str, epoch: int, rid: str, local: int, tokens: int) -> None:
        """Tokens charged without a grant (a generation's backlog carried into the next)."""
        ledger = self.ledgers.get((key, epoch))
        if ledger is None:
            ledger = self.ledgers[(key, epoch)] = _Ledger(self.now, epoch)
        own = ledger.own[rid] = ledger.own.get(rid, 0) + tokens
        times, cumulative = ledger.log.setdefault(rid, ([], []))
        times.append(self.now)
        cumulative.append(own)
        self.seq += 1
        insort(ledger.arrivals, (local, self.seq, tokens))
        ledger.peak = None
        self.result.carried += tokens

    # -- checks ----------------------------------------------------------------------

    def _fail(self, invariant: str, detail: str) -> NoReturn:
        raise InvariantViolation(self.seed, invariant, detail, self.replay)

    def _check_join(self, i: int, key: str, entries: Iterable[str] | None = None) -> None:
        """Replica ``i``'s ``used`` for ``key`` is the max of what it was delivered (only
        ``entries`` of it, after a delivery carrying just those) and its own grants."""
        limiter = self.limiters[i]
        bucket = limiter.buckets.get(key)
        if bucket is None or bucket.config.mode != SHARED:
            return
        rid = limiter.replica_id
        heard = self.knowledge[i].get((key, bucket.epoch), {})
        others = bucket.others or {}
        if entries is None:
            # heard values are non-zero; a bucket may hold a peer's zero entry
            same = sum(1 for value in others.values() if value) == len(heard) - (rid in heard)
            entries = heard
        else:
            same = True
        for other in entries:
            if other != rid and others.get(other, 0) != heard.get(other, 0):
                same = False
        ledger = self.ledgers.get((key, bucket.epoch))
        own = ledger.own.get(rid, 0) if ledger else 0
        echo = heard.get(rid, 0)
        if not same or bucket.mine != (own if own > echo else echo):
            self._fail(
                "merge is the join of everything delivered",
                f"{rid} holds {key!r} epoch {bucket.epoch} with used {bucket.used(rid)} "
                f"but was delivered {heard} and granted {own} itself",
            )

    def _check_join_all(self) -> None:
        for i, limiter in enumerate(self.limiters):
            for key in list(limiter.buckets):
                self._check_join(i, key)

    def check(self) -> SimResult:
        """Convergence, conservation and isolation after ``quiesce()``; returns the result."""
        now = self.now
        for i, limiter in enumerate(self.limiters):
            for key, bucket in limiter.buckets.items():
                if bucket.config.mode != SHARED and any(
                    # a restored snapshot keeps an earlier incarnation's count as a peer's
                    not rid.startswith(f"r{i}/n/")
                    for rid in bucket.others or ()
                ):
                    self._fail(
                        "local and strict buckets never replicate",
                        f"{limiter.replica_id} holds entries {bucket.others} of "
                        f"{bucket.config.mode} key {key!r}",
                    )
                if bucket.config.mode != SHARED:
                    ledger = self.ledgers.get((key, bucket.epoch))
                    own = ledger.own.get(limiter.replica_id, 0) if ledger else 0
                    if bucket.mine != own:
                        self._fail(
                            "no lost consumption",
                            f"r{i} granted {own} of {bucket.config.mode} key {key!r} "
                            f"but holds {bucket.mine}",
                        )
        reference = self.limiters[0]
        for i, limiter in enumerate(self.limiters[1:], start=1):
            if limiter.rule_configs != reference.rule_configs:
                self._fail(
                    "convergence",
                    f"rule configs differ: r0 {reference.rule_configs} vs r{i} "
                    f"{limiter.rule_configs}",
                )
        # shadow marks (PATCH "shadow", a config field): every replica lets the same
        # refusals through, the newest mark wherever it was set
        for key, rule_name in self.rule_of.items():
            marks = [
                limiter.shadowed(rule_name, key)
                for limiter in self.limiters
                if key in limiter.buckets or key in limiter.key_configs  # (else: swept)
            ]
            if any(mark != marks[0] for mark in marks):
                self._fail("convergence", f"shadow marks of {key!r} differ: {marks}")
        shared = sorted(
            {
                key
                for limiter in self.limiters
                for key, bucket in limiter.buckets.items()
                if bucket.config.mode == SHARED
            }
        )
        for key in shared:
            copies = [limiter.buckets.get(key) for limiter in self.limiters]
            if None in copies:
                # Dropping a bucket full for longer than its ttl is the same as keeping
                # it: a replica that swept one need not learn it back from the others,
                # as long as every copy still held is expired too.
                missing = self.limiters[copies.index(None)].replica_id
                for i, copy in enumerate(copies):
                    if copy is not None and not copy.expired(now + self.skews[i]):
                        self._fail(
                            "convergence",
                            f"{missing} never learned {key!r}, which "
                            f"{self.limiters[i].replica_id} holds unexpired",
                        )
                continue
            states = []
            for limiter in self.limiters:
                held = limiter.buckets.get(key)
                if held is None:
                    self._fail("convergence", f"{limiter.replica_id} never learned {key!r}")
                states.append(_neutral(held.full_state(key, limiter.replica_id)))
            for i, state in enumerate(states[1:], start=1):
                if state != states[0]:
                    self._fail("convergence", f"{key!r}: r0 holds {states[0]}, r{i} {state}")
            answers = [lim.peek(key, rule=self.rule_of[key], now=now) for lim in self.limiters]
            for i, answer in enumerate(answers[1:], start=1):
                if answer != answers[0]:
                    self._fail(
                        "convergence", f"{key!r} at {now}: r0 answers {answers[0]}, r{i} {answer}"
                    )
            epoch, _, _, _, used, _ = states[0]
            ledger = self.ledgers.get((key, epoch))
            granted = dict(sorted(ledger.own.items())) if ledger else {}
            converged: dict[str, int] = dict(used)
            for rid in list(granted):
                floor = self.forgotten.get((key, epoch, rid))
                if floor is not None and floor <= converged.get(rid, 0) <= granted[rid]:
                    self.result.forgotten += granted[rid] - converged.get(rid, 0)
                    granted[rid] = converged.get(rid, 0)
            if converged != {rid: n for rid, n in granted.items() if n}:
                self._fail(
                    "no lost consumption",
                    f"{key!r} epoch {epoch}: converged used {dict(used)} "
                    f"(Σ {sum(n for _, n in used)}) but granted {granted} "
                    f"(Σ {sum(granted.values())})",
                )
        if self.check_int64:
            for i, limiter in enumerate(self.limiters):
                self._encodable(i, "snapshot", limiter.snapshot)
        self._check_generations(shared)
        self._check_configs()
        return self.result

    def _check_generations(self, shared: Sequence[str]) -> None:
        """Issue 12, case 10: a key whose generation was replaced by a later one (a
        partition straddling an epoch boundary) keeps the older one's debt. The
        converged TAT is at most a bucket's worth, one slice, one sync round and the
        skew below the GCRA (Lindley) TAT of every grant of the key in any generation:
        what a replica spent after its last carry within one sync delay is all that can
        be forgotten. Checked where no bucket expires, nothing restarted and the
        key's config never changed."""
        if self.expire_interval_ns or self.result.restarts or max(self.incarnations) > 1:
            return
        for key in shared:
            limits = self.limits[key]
            epochs = {epoch for name, epoch in self.ledgers if name == key}
            arrivals = self.key_arrivals.get(key)
            if len(epochs) < 2 or limits.changes or not arrivals:
                continue
            interval = limits.interval_ns
            true_tat = None
            for stamp, tokens in sorted(arrivals):
                start = stamp if true_tat is None or true_tat < stamp else true_tat
                true_tat = start + tokens * interval
            assert true_tat is not None
            bucket = self.limiters[0].buckets.get(key)
            if bucket is None:
                continue
            slack = (
                limits.capacity * interval
                + limits.slice_ns
                + self.sync_interval_ns
                + self.network.delay_max_ns
                + self.skew_spread
                + self.jumped_ns * self.n
            )
            if bucket.tat() < true_tat - slack:
                self._fail(
                    "a generation's debt survives the epoch boundary",
                    f"{key!r} converged on epoch {bucket.epoch} with TAT {bucket.tat()}, "
                    f"{(true_tat - bucket.tat()) / interval:.1f} tokens below the GCRA TAT "
                    f"of its {sum(n for _, n in arrivals)} grants in epochs {sorted(epochs)} "
                    f"(allowance {slack / interval:.1f})",
                )

    def _winner(
        self, target: str, base: BucketConfig | None, lost: bool = True
    ) -> BucketConfig | None:
        """The newest of ``base`` and every accepted configure call of ``target``
        (without ``lost``: but those only a replica restarted without a snapshot held)."""
        for name, config in self.configured:
            if name != target or (not lost and config.version in self.lost_configs):
                continue
            if base is None or config.version > base.version:
                base = config
        return base

    def _check_configs(self) -> None:
        """Cases 5 and 11 after quiescence. A PATCH only a replica restarted without a
        snapshot held, cut off from every peer, may be lost (docs/storage.md): each
        check passes if it holds with that PATCH or without it."""
        for check in (self._files_broken, self._strict_configs_broken):
            broken = check(True)
            if broken and check(False):
                self._fail(*broken)

    def _files_broken(self, lost: bool) -> tuple[str, str] | None:
        """Issue 12, case 5: after rolling restarts onto an edited rules file, every
        replica holds the newest file's limits (a PATCH of the rule wins over any file),
        and so does every live bucket of the rule without a newer per-key config."""
        for name, rule in sorted(self.newest_file.items()):
            patched = self._winner(name, None, lost)
            want = rule_config(rule)
            for i, limiter in enumerate(self.limiters):
                held = limiter.rule_configs[name]
                if patched is not None:
                    ok = held == patched
                else:
                    ok = _limits(held) == _limits(want) and held.version[1].endswith(
                        ":" + rule_digest(rule)
                    )
                if not ok:
                    return (
                        "the newest rules file wins",
                        f"r{i} holds rule {name!r} as {held} after every replica loaded "
                        f"{_limits(want)} (newest PATCH: {patched})",
                    )
                for key, bucket in limiter.buckets.items():
                    if bucket.rule != name:
                        continue
                    whole = self._winner(key, held, lost)
                    assert whole is not None
                    if _limits(bucket.config) != _limits(share_of(whole, self.n)):
                        return (
                            "live buckets obey the newest rules file",
                            f"r{i}'s bucket {key!r} has {_limits(bucket.config)} but its "
                            f"rule's config is {_limits(whole)}",
                        )
        return None

    def _strict_configs_broken(self, lost: bool) -> tuple[str, str] | None:
        """Issue 12, case 11: after quiescence every region holds a strict key's newest
        per-key config (also where the key expired) and uses its share: the regions'
        capacities sum to at most the patched limit."""
        for key, name in sorted(self.rule_of.items()):
            patched = self._winner(key, None, lost)
            if patched is None or patched.mode != STRICT:
                continue
            rule_newest = self.limiters[0].rule_configs[name]
            whole = patched if patched.version > rule_newest.version else rule_newest
            share = share_of(whole, self.n)
            total = 0
            for i, limiter in enumerate(self.limiters):
                bucket = limiter.buckets.get(key)
                kept = limiter.key_configs.get(key)
                if whole is patched and kept != patched:
                    return (
                        "a strict key's per-key config outlives its bucket",
                        f"r{i} holds {kept} for {key!r}, not the newest PATCH {patched}",
                    )
                if bucket is not None:
                    if _limits(bucket.config) != _limits(share):
                        return (
                            "each region uses the patched share",
                            f"r{i}'s {key!r} has {_limits(bucket.config)}, the share of "
                            f"{_limits(whole)} is {_limits(share)}",
                        )
                    total += bucket.config.capacity
                else:
                    total += share.capacity
            if total > whole.capacity:
                return (
                    "strict shares sum to at most the limit",
                    f"{key!r}: the regions' capacities sum to {total} > {whole.capacity}",
                )
        return None


def _state_of(limiter: Limiter) -> tuple[Any, ...]:
    """What a replica holds, to compare before and after a refused PATCH."""
    rid = limiter.replica_id
    buckets = {key: bucket.full_state(key, rid) for key, bucket in limiter.buckets.items()}
    return (
        dict(limiter.rule_configs),
        dict(limiter.key_configs),
        buckets,
        set(limiter.dirty),
        set(limiter.dirty_rules),
    )


def _changed_state(before: tuple[Any, ...], after: tuple[Any, ...]) -> str:
    """What differs (empty if nothing). A key the refused PATCH named and nobody had
    used yet may now hold a fresh, full bucket: the same as none."""
    names = ("rule configs", "per-key configs", "buckets", "dirty keys", "dirty rules")
    for name, old, new in zip(names, before, after, strict=True):
        if name == "buckets":
            for key, delta in new.items():
                if key not in old and not any(delta.used.values()):
                    continue
                if old.get(key) != delta:
                    return f"bucket {key!r}: {old.get(key)} -> {delta}"
            if set(old) - set(new):
                return f"buckets {sorted(set(old) - set(new))} dropped"
        elif old != new:
            return f"{name}: {old} -> {new}"
    return ""


def _outside_int64(value: Any) -> int | None:
    """The first integer in decoded msgpack ``value`` outside int64, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, int):
            if not -(2**63) <= item < 2**63:
                return item
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return None


def _limits(config: BucketConfig) -> tuple[int, int, int, str]:
    return (config.capacity, config.interval_ns, config.ttl_ns, config.mode)


def _neutral(delta: BucketDelta) -> tuple[Any, ...]:
    """A bucket state compared without the replica that holds it."""
    used = tuple(sorted((rid, n) for rid, n in delta.used.items() if n))
    return (delta.epoch, delta.config, delta.base_version, delta.base_time, used, delta.rule)


# -- random schedules -------------------------------------------------------------------


def random_simulation(
    seed: int, *, replicas: int | None = None, events: int | None = None, expiry: bool = False
) -> tuple[Simulation, int]:
    """A seeded random schedule on a fresh simulation, and the true time traffic ends.

    With ``expiry``, ttls are short and traffic comes in two bursts separated by
    an idle gap long enough for buckets to refill, expire and be swept, so that
    keys are re-created in a new epoch (invariants are then checked per epoch).
    """
    rng = random.Random(seed)
    low_rate = 1.3 if expiry else 0.3
    n = replicas if replicas is not None else rng.randint(2, 5)
    acquires = events if events is not None else rng.randint(80, 200)
    rules: list[Rule] = []
    keys: dict[str, str] = {}
    # issue 23: one side of a partition busy, the other quiet; issue 12 case 10: a
    # partition straddling an epoch boundary, the key first used on the far side after it
    busy_quiet = not expiry and n >= 2 and rng.random() < 0.3
    straddle = not expiry and n >= 2 and rng.random() < 0.2
    jumps = rng.choice((0, 0, 0, 1, 2))
    for number in range(rng.randint(1, 3)):
        name = "abc"[number]
        roll = rng.random()
        mode = SHARED if roll < 0.7 else (LOCAL if roll < 0.85 else STRICT)
        capacity = rng.randint(n if mode == STRICT else 1, max(n, 10 if expiry else 20))
        rate = round(10 ** rng.uniform(low_rate, 2.3), 3)
        ttl = round(rng.uniform(0.2, 0.5), 3) if expiry else 3600.0
        template = f"{name}-{{{{ .Request.Header.X-Key }}}}"
        rules.append(Rule.create(template, capacity, rate, name=name, mode=mode, ttl=ttl))
        for index in range(rng.randint(1, 2)):
            keys[f"{name}-{index}"] = name
    delay_min = rng.randint(0, 2 * MS)
    network = Network(
        delay_min_ns=delay_min,
        delay_max_ns=delay_min + rng.randint(0, 40 * MS),
        drop=0.0 if rng.random() < 0.3 else rng.uniform(0.0, 0.3),
        duplicate=0.0 if rng.random() < 0.5 else rng.uniform(0.0, 0.2),
    )
    if straddle:
        capacity = rng.randint(1, 20)
        rate = round(10 ** rng.uniform(1.0, 2.3), 3)
        # ttl 1 s: epochs begin on whole seconds, the first at START + 877 ms
        rules.append(
            Rule.create("s-{{ .Request.Header.X-Key }}", capacity, rate, name="s", ttl=1.0)
        )
        keys["s-0"] = "s"
    duration = rng.randint(200 * MS, 1_000 * MS)
    if straddle:
        duration = max(duration, 1_100 * MS)
    sync = max(rng.randint(5 * MS, 50 * MS), duration // 25)
    anti_entropy = max(rng.randint(50 * MS, 200 * MS), duration // 5)
    sim = Simulation(
        seed,
        n,
        rules,
        keys,
        network=network,
        sync_interval_ns=sync,
        anti_entropy_interval_ns=anti_entropy,
        expire_interval_ns=rng.randint(30 * MS, 150 * MS) if expiry else None,
    )
    flags = [f"--seed {seed}"]
    flags += [f"--replicas {replicas}"] if replicas is not None else []
    flags += [f"--events {events}"] if events is not None else []
    flags += ["--expiry"] if expiry else []
    sim.replay = "bucketmesh sim " + " ".join(flags)
    start = sim.start_ns
    gap = rng.randint(1_500 * MS, 2_500 * MS) if expiry else 0
    if expiry:
        duration //= 2
    key_names = sorted(key for key in keys if keys[key] != "s")
    by_name = {rule.name: rule for rule in rules}
    hot = rng.randrange(n)
    draw = rng.random
    for _ in range(acquires):
        at = start + int(draw() * duration) + (gap + duration if draw() < 0.5 and gap else 0)
        replica = hot if draw() < 0.3 else int(draw() * n)
        roll = draw()
        tokens = 0 if roll < 0.1 else (1 if roll < 0.8 else 1 + int(draw() * 3))
        sim.acquire(at, replica, key_names[int(draw() * len(key_names))], tokens)
    for _ in range(rng.choice((0, 0, 0, 1, 2))):
        rule = rng.choice(rules)
        target = rule.name if rng.random() < 0.6 else rng.choice(sorted(keys_of(keys, rule)))
        floor = n if rule.mode == STRICT else 1
        sim.configure(
            start + rng.randrange(duration),
            rng.randrange(n),
            target,
            capacity=rng.randint(floor, max(floor, 25)) if rng.random() < 0.7 else None,
            refill_rate=round(10 ** rng.uniform(low_rate, 2.3), 3) if rng.random() < 0.7 else None,
        )
    for _ in range(rng.choice((0, 0, 1, 1, 2))):
        if n < 2:
            break
        begin = start + rng.randrange(duration)
        length = rng.randint(10 * MS, duration // 2)
        k = rng.randint(2, min(3, n))
        members = list(range(n))
        rng.shuffle(members)
        groups: list[list[int]] = [[] for _ in range(k)]
        for position, replica in enumerate(members):
            groups[position if position < k else rng.randrange(k)].append(replica)
        sim.partition(begin, begin + length, groups)
    if busy_quiet:
        shared = [
            key for key in key_names if keys[key] != "s" and by_name[keys[key]].mode == SHARED
        ]
        if shared:
            key = rng.choice(shared)
            rule = by_name[keys[key]]
            interval = interval_for(rule.refill_rate)
            begin = start + rng.randrange(duration // 2)
            length = rng.randint(duration // 4, duration // 2)
            busy = rng.randrange(n)
            sim.partition(begin, begin + length, [[busy], [r for r in range(n) if r != busy]])
            quiet = rng.choice([r for r in range(n) if r != busy])
            every = max(MS, interval // 3)
            at = begin
            while at < begin + length and at < begin + 400 * every:
                sim.acquire(at, busy, key)
                at += every
            every = max(MS, interval * rule.capacity * 3 // 2)
            at = begin + rng.randrange(every)
            while at < begin + length:
                sim.acquire(at, quiet, key)
                at += every
    if straddle:
        boundary = start - start % NS_PER_S + NS_PER_S  # START + 877 ms
        begin = boundary - rng.randint(100 * MS, 500 * MS)
        end = boundary + rng.randint(50 * MS, 200 * MS)
        side = rng.randrange(n)
        sim.partition(begin, end, [[side], [r for r in range(n) if r != side]])
        far = rng.choice([r for r in range(n) if r != side])
        interval = interval_for(rules[-1].refill_rate)
        every = max(MS, interval // 2)
        at = begin + 5 * MS
        while at < end:
            sim.acquire(at, side, "s-0")
            at += every
        at = boundary + rng.randint(MS, 40 * MS)
        while at < end + 200 * MS:
            sim.acquire(at, far, "s-0")
            at += every
    # shadow marks set and cleared by PATCH (their own generator: the schedules of
    # every seed drawn before them stay as they were). In expiry schedules too: there
    # they found (seed 384 --expiry) that a generation replaced by a later one while
    # the bucket lived came back, after the later one expired, without this replica's
    # own count in it (the limiter now remembers it as it does a dropped bucket's).
    marks = random.Random(f"shadow-{seed}")
    for _ in range(marks.choice((0, 1, 2, 3))):
        rule = marks.choice(rules)
        target = rule.name if marks.random() < 0.5 else marks.choice(keys_of(keys, rule))
        sim.configure(
            start + marks.randrange(duration),
            marks.randrange(n),
            target,
            shadow=marks.random() < 0.6,
        )
    for _ in range(jumps):
        # a clock stepped back (or forward) and corrected later
        begin = start + rng.randrange(duration)
        offset = rng.choice((-1, 1)) * rng.randint(MS, 100 * MS)
        replica = rng.randrange(n)
        sim.jump(begin, replica, offset)
        sim.jump(begin + rng.randint(10 * MS, duration // 2), replica, -offset)
    return sim, start + 2 * duration + gap if gap else start + duration


#: extreme limits (issue 12, case 1): the ends of every accepted range and realistic
#: throttles (one token a day, the seed rule's 50/s, a capacity raised to 1e9)
EXTREME_CAPACITIES: Final = (1, 2, 5, 20, 5_000, 10**9, 10**15, 2**53 - 1)
EXTREME_RATES: Final = (1e-9, 1 / 86_400, 0.05, 1.0, 50.0, 1e6, 1e9)
EXTREME_TTLS: Final = (3600.0, 86_400.0, 1e8, 1e9)


def _burst_ok(capacity: int, rate: float) -> bool:
    try:
        check_burst(capacity, interval_for(rate))
    except LimitError:
        return False
    return True


def _base_network(rng: random.Random) -> Network:
    delay_min = rng.randint(0, 2 * MS)
    return Network(
        delay_min_ns=delay_min,
        delay_max_ns=delay_min + rng.randint(0, 40 * MS),
        drop=0.0 if rng.random() < 0.3 else rng.uniform(0.0, 0.3),
        duplicate=0.0 if rng.random() < 0.5 else rng.uniform(0.0, 0.2),
    )


def _random_partitions(
    sim: Simulation, rng: random.Random, start: int, duration: int, count: int
) -> None:
    n = sim.n
    for _ in range(count if n >= 2 else 0):
        begin = start + rng.randrange(duration)
        groups: list[list[int]] = [[], []]
        members = list(range(n))
        rng.shuffle(members)
        for position, replica in enumerate(members):
            groups[position if position < 2 else rng.randrange(2)].append(replica)
        sim.partition(begin, begin + rng.randint(10 * MS, duration // 2), groups)


def extreme_simulation(seed: int, *, replicas: int | None = None) -> tuple[Simulation, int]:
    """Issue 12, case 1: rules and PATCHes at the ends of every accepted range (tiny
    refill rates, huge capacities and ttls) after long spending histories (acquires
    of up to 1e12 tokens at once), mixed with acquires, merges and partitions, on a
    2027 wall clock. Also PATCHes the limiter must refuse (capacity × interval beyond
    a span the state can store). Checked besides the usual invariants: every batch,
    snapshot and full state encodes with the real msgpack encoder, every integer in
    it within int64; a refused PATCH changes nothing; every replica keeps replicating
    (convergence after quiescence)."""
    rng = random.Random(seed)
    n = replicas if replicas is not None else rng.randint(2, 4)
    rules: list[Rule] = []
    keys: dict[str, str] = {}
    for number in range(rng.randint(1, 2)):
        name = "xy"[number]
        mode = SHARED if rng.random() < 0.7 else rng.choice((LOCAL, STRICT))
        while True:
            capacity = rng.choice(EXTREME_CAPACITIES)
            rate = rng.choice(EXTREME_RATES)
            if _burst_ok(capacity, rate) and (mode != STRICT or capacity >= n):
                break
        ttl = rng.choice(EXTREME_TTLS)
        template = f"{name}-{{{{ .Request.Header.X-Key }}}}"
        rules.append(Rule.create(template, capacity, rate, name=name, mode=mode, ttl=ttl))
        for index in range(rng.randint(1, 2)):
            keys[f"{name}-{index}"] = name
    duration = rng.randint(200 * MS, 800 * MS)
    sim = Simulation(
        seed,
        n,
        rules,
        keys,
        network=_base_network(rng),
        sync_interval_ns=rng.randint(5 * MS, 50 * MS),
        anti_entropy_interval_ns=rng.randint(50 * MS, 200 * MS),
        start_ns=WALL_START_NS,
    )
    sim.check_int64 = True
    flags = f"--seed {seed} --kind extreme" + (f" --replicas {replicas}" if replicas else "")
    sim.replay = "bucketmesh sim " + flags
    start = sim.start_ns
    names = sorted(keys)
    for _ in range(rng.randint(20, 80)):
        roll = rng.random()
        tokens = 1 if roll < 0.5 else rng.choice((2, 20, 5_000, 10**9, 10**12))
        sim.acquire(start + rng.randrange(duration), rng.randrange(n), rng.choice(names), tokens)
    for _ in range(rng.randint(1, 4)):
        rule = rng.choice(rules)
        target = rule.name if rng.random() < 0.5 else rng.choice(keys_of(keys, rule))
        patched: int | None = rng.choice(EXTREME_CAPACITIES) if rng.random() < 0.6 else None
        throttle: float | None = None
        if rng.random() < 0.7 or patched is None:
            throttle = rng.choice(EXTREME_RATES)
        if rule.mode == STRICT and patched is not None and patched < n:
            patched = n
        sim.configure(
            start + rng.randrange(duration),
            rng.randrange(n),
            target,
            capacity=patched,
            refill_rate=throttle,
        )
    _random_partitions(sim, rng, start, duration, rng.choice((0, 1)))
    return sim, start + duration


def files_simulation(seed: int, *, replicas: int | None = None) -> tuple[Simulation, int]:
    """Issue 12, case 5: a rule's limits are edited in the rules file, and the nodes
    are restarted onto it one by one in a random order (some twice), each with or
    without a snapshot, under traffic, drops and partitions, sometimes with a PATCH
    of the rule or a key in between. After quiescence every replica must hold the
    newest file's limits (unless a PATCH of the rule is newer: runtime changes win
    over any file) and its live buckets must obey them."""
    rng = random.Random(seed)
    n = replicas if replicas is not None else rng.randint(2, 4)
    old_rules: list[Rule] = []
    new_rules: list[Rule] = []
    keys: dict[str, str] = {}
    for number in range(rng.randint(1, 2)):
        name = "fg"[number]
        mode = SHARED if rng.random() < 0.7 else rng.choice((LOCAL, STRICT))
        template = f"{name}-{{{{ .Request.Header.X-Key }}}}"
        capacity = rng.randint(n, n + 30)
        rate = round(10 ** rng.uniform(0.3, 2.0), 3)
        old = Rule.create(template, capacity, rate, name=name, mode=mode, ttl=3600.0)
        edited = rng.random() < 0.8 or not number
        if edited:
            capacity = rng.choice([c for c in range(n, n + 31) if c != capacity])
            if rng.random() < 0.5:
                rate = round(10 ** rng.uniform(0.3, 2.0), 3)
        new = Rule.create(template, capacity, rate, name=name, mode=mode, ttl=3600.0)
        old_rules.append(old)
        new_rules.append(new)
        for index in range(rng.randint(1, 2)):
            keys[f"{name}-{index}"] = name
    duration = rng.randint(400 * MS, 1_000 * MS)
    sim = Simulation(
        seed,
        n,
        old_rules,
        keys,
        network=_base_network(rng),
        sync_interval_ns=rng.randint(5 * MS, 50 * MS),
        anti_entropy_interval_ns=rng.randint(50 * MS, 200 * MS),
    )
    flags = f"--seed {seed} --kind files" + (f" --replicas {replicas}" if replicas else "")
    sim.replay = "bucketmesh sim " + flags
    sim.newest_file = {rule.name: rule for rule in new_rules}
    start = sim.start_ns
    names = sorted(keys)
    for _ in range(rng.randint(40, 120)):
        sim.acquire(start + rng.randrange(duration), rng.randrange(n), rng.choice(names))
    order = list(range(n))
    rng.shuffle(order)
    order += [rng.randrange(n) for _ in range(rng.choice((0, 0, 1)))]  # one restarted twice
    times = sorted(start + rng.randrange(duration) for _ in order)
    for at, replica in zip(times, order, strict=True):
        state = rng.random()  # a snapshot, only the write-ahead log, nothing
        sim.reload(at, replica, new_rules, snapshot=state < 0.6, log_only=state < 0.25)
    for _ in range(rng.choice((0, 0, 0, 1))):
        rule = rng.choice(new_rules)
        target = rule.name if rng.random() < 0.5 else rng.choice(keys_of(keys, rule))
        sim.configure(
            start + rng.randrange(duration),
            rng.randrange(n),
            target,
            capacity=rng.randint(n, n + 30),
        )
    _random_partitions(sim, rng, start, duration, rng.choice((0, 0, 1)))
    return sim, start + duration


def strict_idle_simulation(seed: int, *, replicas: int | None = None) -> tuple[Simulation, int]:
    """Issue 12, case 11: a strict key is PATCHed (capacity, refill or both) in one
    region, then goes idle past its ttl in some regions, whose buckets expire and are
    swept, and is used again there, under drops and partitions. At every grant a
    region holds no older config of the key than it held before; after quiescence
    every region holds the newest per-key config and uses its share, and the
    regions' capacities sum to at most the patched limit."""
    rng = random.Random(seed)
    n = replicas if replicas is not None else rng.randint(2, 4)
    capacity = rng.randint(2 * n, 2 * n + 60)
    rate = round(10 ** rng.uniform(0.5, 2.0), 3)
    ttl = round(rng.uniform(0.2, 0.4), 3)
    rule = Rule.create(
        "k-{{ .Request.Header.X-Key }}", capacity, rate, name="k", mode=STRICT, ttl=ttl
    )
    keys = {f"k-{index}": "k" for index in range(rng.randint(1, 2))}
    sim = Simulation(
        seed,
        n,
        [rule],
        keys,
        network=_base_network(rng),
        sync_interval_ns=rng.randint(5 * MS, 30 * MS),
        anti_entropy_interval_ns=rng.randint(50 * MS, 150 * MS),
        expire_interval_ns=rng.randint(30 * MS, 100 * MS),
    )
    flags = f"--seed {seed} --kind strict-idle" + (f" --replicas {replicas}" if replicas else "")
    sim.replay = "bucketmesh sim " + flags
    start = sim.start_ns
    busy = start + rng.randint(200 * MS, 400 * MS)
    ttl_ns = round(ttl * NS_PER_S)
    # idle past the ttl and the refill of a drained share (at most C/r ≈ 60/3 s... bounded
    # below by the generator's rates: C·n/r ≤ 2 s), so the idlers' buckets are swept
    idle = busy + rng.randint(ttl_ns + 2_000 * MS, 2 * ttl_ns + 2_500 * MS)
    again = idle + rng.randint(300 * MS, 600 * MS)
    names = sorted(keys)
    idlers = set(rng.sample(range(n), rng.randint(1, n)))
    for _ in range(rng.randint(40, 120)):
        replica = rng.randrange(n)
        at = start + rng.randrange(busy - start)
        sim.acquire(at, replica, rng.choice(names))
    for replica in range(n):
        # the regions that do not idle keep using the key through the gap
        if replica not in idlers:
            at = busy
            while at < idle:
                sim.acquire(at, replica, rng.choice(names))
                at += rng.randint(20 * MS, ttl_ns // 2)
    for _ in range(rng.randint(20, 80)):
        sim.acquire(idle + rng.randrange(again - idle), rng.randrange(n), rng.choice(names))
    for _ in range(rng.randint(1, 2)):
        new_capacity = rng.randint(n, 2 * capacity) if rng.random() < 0.8 else None
        new_rate = round(10 ** rng.uniform(0.5, 2.0), 3) if rng.random() < 0.5 else None
        if new_capacity is None and new_rate is None:
            new_capacity = n
        sim.configure(
            start + rng.randrange(busy - start),
            rng.randrange(n),
            rng.choice(names),
            capacity=new_capacity,
            refill_rate=new_rate,
        )
    _random_partitions(sim, rng, start, busy - start, rng.choice((0, 1)))
    return sim, again


# -- retiring incarnations (issue 16 item 2) ----------------------------------------

#: The sync window of the simulated mesh: a message sealed longer ago than this is
#: refused on arrival, as ``protocol.SyncAuth.open`` refuses one older than ±30 s
#: (scaled down with every other duration of the simulation).
RETIRE_WINDOW_NS: Final = 300 * MS
RETIRE_MAX_SKEW_NS: Final = 2 * MS
#: How long the simulated reconcile waits between its two looks: the window plus
#: the clock skew either way (``bucketmesh reconcile --fold-wait``, 35 s by default).
RETIRE_WAIT_NS: Final = RETIRE_WINDOW_NS + 2 * RETIRE_MAX_SKEW_NS + 1 * MS


class RetireSimulation:
    """Regions restarting again and again (gracefully from a snapshot, or crashing
    without one) under load on two hot keys, while a simulated ``bucketmesh
    reconcile`` reads every region's state (``plan_folds``) and pushes folds of the
    retired incarnations; the network delays, reorders, duplicates and drops
    messages, one region lags behind by up to the sync window, and partitions cut
    regions off. Checked at every step:

    * **Never a double count.** In every region's view, for every node, the folded
      count plus the entries of its unfolded incarnations is at most what that node
      granted, every entry at most what its incarnation granted, and the folded
      count at most what the folded incarnations granted.
    * **Never a re-grant.** A fold never lowers a region's TAT, and a message a
      region accepts never carries, for an incarnation that region has folded, more
      than the fold counted (which would be consumption forgotten: refill handed
      out again).
    * After quiescence: every region holds the same state, whose total is exactly
      every token any region counted (no lost consumption); and after a last round
      of grants and a reconcile, each hot bucket holds one entry per live replica.

    ``mutant`` weakens the planner to show that the checks catch it: ``unfinal``
    folds without the every-region-holds-the-final-value condition, ``young``
    without the condition that the successor has run for a sync window.
    """

    def __init__(self, seed: int, *, regions: int | None = None, mutant: str = "") -> None:
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.mutant = mutant
        self.n = regions or rng.randint(2, 4)
        capacity = rng.choice((4, 8, 20, 50))
        rate = rng.choice((10.0, 40.0, 200.0))
        self.rule = Rule.create(
            "h-{{ .Request.Header.X-Key }}", max(capacity, self.n), rate, name="h", ttl=3600.0
        )
        self.keys = ("h-a", "h-b")
        self.now = START_NS
        self.skews = [rng.randint(-RETIRE_MAX_SKEW_NS, RETIRE_MAX_SKEW_NS) for _ in range(self.n)]
        self.incarnation = [1] * self.n
        self.limiters = [self._new(i, None) for i in range(self.n)]
        self.lagging = rng.randrange(self.n)
        self.drop = rng.choice((0.0, 0.05))
        self.duplicate = rng.choice((0.0, 0.1, 0.3))
        self.cut: set[int] = set()  # regions cut off from every other
        self.queue: list[tuple[int, int, Callable[..., object], tuple[Any, ...]]] = []
        self.seq = 0
        #: (key, replica id) -> tokens that incarnation granted
        self.granted: dict[tuple[str, str], int] = {}
        #: (key, replica id) -> the most any accepted message, restored snapshot or live
        #: owner held for it: what the converged state must count
        self.held: dict[tuple[str, str], int] = {}
        #: (key, replica id) -> what a planned fold counted for that incarnation
        self.accounted: dict[tuple[str, str], int] = {}
        #: key -> tokens a crash may have forgotten (held by no other region then)
        self.forgotten: dict[str, int] = {}
        self.folds = 0
        self.entries_folded = 0
        self.restarts = 0
        self.refused = 0
        self.grants = 0

    # -- plumbing ----------------------------------------------------------------

    def _new(self, i: int, snapshot: bytes | None) -> Limiter:
        rid = f"r{i}/n/{self.incarnation[i]}"
        clock = partial(self.local, i)
        if snapshot is None:
            return Limiter([self.rule], replica_id=rid, clock=clock, regions=self.n)
        return Limiter.restore(snapshot, [self.rule], replica_id=rid, clock=clock, regions=self.n)

    def local(self, i: int) -> int:
        return self.now + self.skews[i]

    def _push(self, at: int, handler: Callable[..., object], *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, handler, args))

    def _fail(self, invariant: str, detail: str) -> NoReturn:
        raise InvariantViolation(
            self.seed,
            invariant,
            detail,
            f"bucketmesh sim --kind retire --seed {self.seed}"
            + (f" (mutant {self.mutant})" if self.mutant else ""),
        )

    def _send(self, src: int, dst: int, batch: DeltaBatch, *, tool: bool = False) -> None:
        """A message from region ``src`` (or the tool) to ``dst``: sealed now on the
        sender's clock, delayed (a lagging region by up to the sync window), maybe
        dropped or duplicated; a cut region's links carry nothing (the tool's do)."""
        rng = self.rng
        if not tool and (src in self.cut or dst in self.cut):
            return
        if rng.random() < self.drop:
            return
        data = _encode(batch)
        sealed = self.now if tool else self.local(src)
        slow = not tool and self.lagging in (src, dst)
        for _ in range(2 if rng.random() < self.duplicate else 1):
            top = RETIRE_WINDOW_NS + 50 * MS if slow else 30 * MS
            self._push(self.now + rng.randint(1 * MS, top), self._deliver, dst, data, sealed)

    def _deliver(self, dst: int, data: bytes, sealed: int) -> None:
        if abs(self.local(dst) - sealed) > RETIRE_WINDOW_NS:
            self.refused += 1  # stale: the receiver refuses it, as the real mesh does
            return
        batch = _decode_batch(data)
        self._merge(dst, batch)

    def _merge(self, dst: int, batch: DeltaBatch) -> None:
        limiter = self.limiters[dst]
        rid = limiter.replica_id
        for delta in batch.deltas:
            bucket = limiter.buckets.get(delta.key)
            for owner, value in delta.used.items():
                slot = (delta.key, owner)
                if bucket is not None and bucket.folded(owner):
                    counted = self.accounted.get(slot)
                    if counted is None or value > counted:
                        self._fail(
                            "never a re-grant",
                            f"{rid} accepted {value} tokens of {owner} on {delta.key!r} "
                            f"after folding it with {counted}: the rest would be granted again",
                        )
                if value > self.held.get(slot, 0):
                    self.held[slot] = value
            if bucket is not None and delta.folds:
                for owner, value in bucket.used(rid).items():
                    slot = (delta.key, owner)
                    covered = any(
                        below_watermark(owner, node, fold[0]) for node, fold in delta.folds.items()
                    )
                    if covered and not bucket.folded(owner) and value > self.accounted.get(slot, 0):
                        self._fail(
                            "never a re-grant",
                            f"a fold counts {self.accounted.get(slot, 0)} tokens of {owner} on "
                            f"{delta.key!r}; {rid} held {value}: the rest would be granted again",
                        )
                # the TAT a region that heard every folded entry's final count would hold
                heard = bucket.full_state(delta.key, rid)
                for (key, owner), counted in self.accounted.items():
                    if (
                        key == delta.key
                        and counted > heard.used.get(owner, 0)
                        and not bucket.folded(owner)
                        and any(below_watermark(owner, n, f[0]) for n, f in delta.folds.items())
                    ):
                        heard.used[owner] = counted
                before = Bucket.from_delta(heard, rid).tat()
                bucket.fold(delta.folds, rid)
                if bucket.tat() < before:
                    self._fail(
                        "never a re-grant",
                        f"a fold left {rid}'s TAT of {delta.key!r} {before - bucket.tat()}ns "
                        "below what the counts it folds in make it",
                    )
        limiter.merge(batch, now=self.local(dst))
        for delta in batch.deltas:
            self._check_counts(dst, delta.key)

    def _check_counts(self, i: int, key: str) -> None:
        limiter = self.limiters[i]
        bucket = limiter.buckets.get(key)
        if bucket is None:
            return
        by_node: dict[str, int] = {}
        for owner, value in bucket.used(limiter.replica_id).items():
            truth = self.granted.get((key, owner), 0)
            if value > truth:
                self._fail(
                    "never a double count",
                    f"r{i} counts {value} tokens of {owner} on {key!r}; it granted {truth}",
                )
            node = incarnation_of(owner)[0]
            by_node[node] = by_node.get(node, 0) + value
        for node, (watermark, tokens) in (bucket.folds or {}).items():
            folded = sum(
                n
                for (k, owner), n in self.granted.items()
                if k == key and below_watermark(owner, node, watermark)
            )
            everything = sum(
                n
                for (k, owner), n in self.granted.items()
                if k == key and incarnation_of(owner)[0] == node
            )
            if tokens > folded or tokens + by_node.get(node, 0) > everything:
                self._fail(
                    "never a double count",
                    f"r{i} folds {tokens} tokens of {node}'s incarnations below {watermark} "
                    f"on {key!r} and counts {by_node.get(node, 0)} more; they granted "
                    f"{folded} and {node} {everything} in all",
                )

    # -- events ----------------------------------------------------------------------

    def _acquire(self, i: int, key: str, tokens: int) -> None:
        limiter = self.limiters[i]
        decision = limiter.acquire(key, tokens, rule="h", now=self.local(i))
        if decision.allowed:
            slot = (key, limiter.replica_id)
            self.granted[slot] = self.granted.get(slot, 0) + tokens
            self.grants += tokens

    def _sync(self, i: int) -> None:
        batch = self.limiters[i].collect_deltas()
        if batch.deltas:
            for j in range(self.n):
                if j != i:
                    self._send(i, j, batch)

    def _anti_entropy(self, i: int) -> None:
        peers = [j for j in range(self.n) if j != i]
        if peers:
            self._send(i, self.rng.choice(peers), self.limiters[i].full_state())

    def _restart(self, i: int, graceful: bool) -> None:
        """SIGTERM (a last full-state push, then a snapshot) or a crash (nothing saved:
        what no message carried yet is forgotten, as docs/storage.md says); the next
        incarnation then pulls from every peer it can reach."""
        old = self.limiters[i]
        self.restarts += 1
        snapshot = None
        if not graceful:
            # what no other region holds may be gone for good (in flight, it may return)
            for key, bucket in old.buckets.items():
                for owner, value in bucket.used(old.replica_id).items():
                    elsewhere = 0
                    for j, limiter in enumerate(self.limiters):
                        other = limiter.buckets.get(key) if j != i else None
                        if other is not None:
                            elsewhere = max(elsewhere, other.used(limiter.replica_id).get(owner, 0))
                    if value > elsewhere:
                        self.forgotten[key] = self.forgotten.get(key, 0) + value - elsewhere
        if graceful:
            full = old.full_state()
            for j in range(self.n):
                if j != i:
                    self._send(i, j, full)
            snapshot = old.snapshot()
        self.incarnation[i] += 1
        limiter = self.limiters[i] = self._new(i, snapshot)
        rid = limiter.replica_id
        for key, bucket in limiter.buckets.items():
            for owner, value in bucket.used(rid).items():
                slot = (key, owner)
                self.held[slot] = max(self.held.get(slot, 0), value)
        for j in range(self.n):
            if j != i and i not in self.cut and j not in self.cut:
                self._merge(i, _decode_batch(_encode(self.limiters[j].full_state())))

    def _reconcile(self) -> None:
        """``bucketmesh reconcile``: say hello to every region (the replica that
        answers), and a sync window later, if the same replicas answer, fold."""
        live = [limiter.replica_id for limiter in self.limiters]
        if self.mutant == "young":
            self._fold(live)  # the mutant: no wait, no second look
            return
        self._push(self.now + RETIRE_WAIT_NS, self._fold, live)

    def _fold(self, first: list[str], *, deliver: bool = True) -> int:
        """Read every region's state, plan the folds of each key, push the join's full
        state carrying them to every region; nothing if a region restarted since
        ``first`` (a process that stopped within the window may have sealed a
        message no running one can account for)."""
        live = [limiter.replica_id for limiter in self.limiters]
        if live != first:
            return 0
        pushed = 0
        for key in self.keys:
            views = [limiter.full_state([key]).deltas for limiter in self.limiters]
            held = [found[0] if found else None for found in views]
            plan = plan_folds(held, live, require_final=self.mutant != "unfinal")
            if not plan:
                continue
            present = [view for view in held if view is not None]
            join = Bucket.from_delta(present[0], "@reconcile/view/0")
            for view in present[1:]:
                join.merge(view, "@reconcile/view/0")
            state = join.full_state(key, "@reconcile/view/0")
            state.used.pop("@reconcile/view/0", None)
            state.folds = dict(plan)
            for node, (watermark, _) in plan.items():
                for owner in list(state.used):
                    if below_watermark(owner, node, watermark):
                        slot = (key, owner)
                        counted = present[0].used.get(owner, 0)  # what plan_folds counts
                        self.accounted[slot] = max(self.accounted.get(slot, 0), counted)
                        self.entries_folded += 1
                        state.used.pop(owner)
                        state.anchor_at.pop(owner, None)
                        state.anchor_used.pop(owner, None)
                        state.anchor_begun.pop(owner, None)
                        state.marks.pop(owner, None)
            self.folds += 1
            pushed += 1
            batch = DeltaBatch("@reconcile/sim/0", [state])
            for j in range(self.n):
                if deliver:
                    self._send(-1, j, batch, tool=True)
                else:
                    self._merge(j, _decode_batch(_encode(batch)))
        return pushed

    def _partition(self, i: int, end: int) -> None:
        self.cut.add(i)
        self._push(end, self.cut.discard, i)

    # -- the schedule ------------------------------------------------------------------

    def schedule(self, duration_ns: int) -> None:
        rng = self.rng
        end = START_NS + duration_ns
        at = START_NS
        while at < end:
            at += rng.randint(1 * MS, 8 * MS)
            key = self.keys[0] if rng.random() < 0.8 else self.keys[1]
            self._push(at, self._acquire, rng.randrange(self.n), key, rng.choice((1, 1, 2)))
        for i in range(self.n):
            tick = START_NS + rng.randrange(20 * MS)
            while tick < end:
                self._push(tick, self._sync, i)
                tick += 20 * MS
            tick = START_NS + rng.randrange(150 * MS)
            while tick < end:
                self._push(tick, self._anti_entropy, i)
                tick += 150 * MS
        at = START_NS
        while True:
            at += rng.randint(50 * MS, 250 * MS)
            if at >= end:
                break
            self._push(at, self._restart, rng.randrange(self.n), rng.random() < 0.5)
        at = START_NS
        while True:
            at += rng.randint(40 * MS, 200 * MS)
            if at >= end:
                break
            self._push(at, self._reconcile)
        for _ in range(rng.randint(0, 3)):
            start = START_NS + rng.randrange(duration_ns)
            self._push(
                start, self._partition, rng.randrange(self.n), start + rng.randint(50, 600) * MS
            )
        self.end = end

    def run_all(self) -> None:
        queue = self.queue
        while queue:
            at, _, handler, args = heapq.heappop(queue)
            self.now = at
            handler(*args)

    def settle(self) -> None:
        """Heal, deliver what is in flight, exchange full state until nothing changes;
        then check convergence and that the total is every token counted anywhere."""
        self.run_all()
        self.cut.clear()
        for _ in range(QUIESCENCE_ROUNDS):
            self.now += 1 * MS
            states = before = [_encode(limiter.full_state()) for limiter in self.limiters]
            for i in range(self.n):
                for j in range(self.n):
                    if i != j:
                        self._merge(j, _decode_batch(states[i]))
            after = [_encode(limiter.full_state()) for limiter in self.limiters]
            if before == after:
                break
        for key in self.keys:
            views = [limiter.buckets.get(key) for limiter in self.limiters]
            if all(view is None for view in views):
                continue
            if any(view is None for view in views):
                self._fail("convergence", f"{key!r} is missing in some region")
            shapes = {
                _encode(
                    (
                        *_neutral(view.full_state(key, limiter.replica_id)),
                        sorted((view.folds or {}).items()),
                    )
                )
                for view, limiter in zip(views, self.limiters, strict=True)
                if view is not None
            }
            if len(shapes) != 1:
                self._fail("convergence", f"regions hold {len(shapes)} states of {key!r}")
            first = views[0]
            assert first is not None
            granted = sum(n for (k, _), n in self.granted.items() if k == key)
            floor = granted - self.forgotten.get(key, 0)
            if not floor <= first.total <= granted:
                self._fail(
                    "no lost consumption",
                    f"{key!r} counts {first.total} tokens in every region; {granted} were "
                    f"granted, of which crashes may have forgotten {granted - floor}",
                )

    def retire_everything(self) -> None:
        """Every live replica grants once on each key once it refilled, a sync window
        passes, reconcile runs: each hot bucket then holds one entry per live replica."""
        self.now += 10 * NS_PER_S  # every bucket full again
        for i in range(self.n):
            for key in self.keys:
                self._acquire(i, key, 1)
        self.settle()
        first = [limiter.replica_id for limiter in self.limiters]
        self.now += RETIRE_WAIT_NS
        self._fold(first, deliver=False)
        self.settle()
        live = {limiter.replica_id for limiter in self.limiters}
        for key in self.keys:
            for limiter in self.limiters:
                bucket = limiter.buckets.get(key)
                if bucket is None:
                    continue
                held = set(bucket.used(limiter.replica_id))
                if held != live:
                    self._fail(
                        "bounded memory",
                        f"{limiter.replica_id} holds {sorted(held)} for {key!r} after the "
                        f"last reconcile; the live replicas are {sorted(live)}",
                    )


def retire_run(seed: int, *, regions: int | None = None, mutant: str = "") -> RetireSimulation:
    """One ``retire`` schedule (1.5 s of simulated time), settled and checked."""
    sim = RetireSimulation(seed, regions=regions, mutant=mutant)
    sim.schedule(1500 * MS)
    sim.run_all()
    sim.settle()
    sim.retire_everything()
    return sim


KINDS: Final = (
    "random",
    "expiry",
    "extreme",
    "files",
    "strict-idle",
    "retire",
    "strict-shares",
)
#: the generators of issue 12's cases 1, 5 and 11 (case 10 is in the random schedule)
CASE_KINDS: Final = ("extreme", "files", "strict-idle")
GENERATORS: Final = {
    "extreme": extreme_simulation,
    "files": files_simulation,
    "strict-idle": strict_idle_simulation,
}


def keys_of(keys: Mapping[str, str], rule: Rule) -> list[str]:
    return [key for key, name in keys.items() if name == rule.name]


def run(
    seed: int,
    *,
    replicas: int | None = None,
    events: int | None = None,
    expiry: bool = False,
    kind: str = "random",
) -> SimResult:
    """One schedule of ``kind`` (``KINDS``), run to quiescence and checked; raises
    InvariantViolation. ``random`` (or ``expiry``) is the general random schedule;
    the others generate the schedules of issue 12's cases 1, 5 and 11."""
    if kind == "retire":
        retire = retire_run(seed, regions=replicas)
        return SimResult(
            seed,
            retire.n,
            len(retire.keys),
            granted=retire.grants,
            restarts=retire.restarts,
            forgotten=sum(retire.forgotten.values()),
            events=retire.seq,
            folded=retire.entries_folded,
        )
    if kind == "strict-shares":
        return _strict_shares(seed)
    generator = GENERATORS.get(kind)
    if generator is not None:
        sim, traffic_end = generator(seed, replicas=replicas)
    else:
        expiry = expiry or kind == "expiry"
        sim, traffic_end = random_simulation(seed, replicas=replicas, events=events, expiry=expiry)
    sim.run(traffic_end)
    sim.quiesce()
    return sim.check()


def _strict_shares(seed: int) -> SimResult:
    """Issue 18: strict mode's transferable shares (``tooling/sim_shares.py``), its
    own generator (not among ``all``'s kinds, so their seeded schedules are unchanged)."""
    from bucketmesh.tooling import sim_shares

    try:
        out = sim_shares.run(seed)
    except sim_shares.Violation as error:
        raise InvariantViolation(
            seed, "strict total within the limit", str(error), f"--seed {seed} --kind strict-shares"
        ) from None
    return SimResult(seed, out.regions, 1, granted=out.granted)


DESCRIPTION = "Run seeded random schedules of the replicated limiter and check invariants."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``bucketmesh sim``."""
    parser.add_argument("--seeds", type=int, default=1000, help="how many schedules (seeds 0..)")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed, verbosely")
    parser.add_argument("--replicas", type=int, help="replicas per schedule (default: 2-5)")
    parser.add_argument("--events", type=int, help="client requests per schedule")
    parser.add_argument(
        "--expiry", action="store_true", help="short ttls and idle gaps: buckets expire"
    )
    parser.add_argument(
        "--kind",
        choices=(*KINDS, "all"),
        default="all",
        help="which generator: random (the general schedule), expiry, extreme (issue 12 "
        "case 1: extreme limits), files (case 5: an edited rules file, rolling restarts), "
        "strict-idle (case 11: a PATCHed strict key idle past its ttl), retire (issue 16: "
        "restarts under load and reconcile folding the retired incarnations away), "
        "strict-shares (issue 18: transferable strict shares under faults); all (default): "
        "every seed runs the random schedule and one of extreme, files, strict-idle",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bucketmesh sim", description=DESCRIPTION)
    add_arguments(parser)
    return run_schedules(parser.parse_args(argv))


def run_schedules(args: argparse.Namespace) -> int:
    """``bucketmesh sim``: run the schedules ``args`` name; 1 if any violated an invariant."""
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    started = time.perf_counter()
    violations: list[InvariantViolation] = []
    worst_excess = worst_ratio = 0.0
    granted = lag = refused = restarts = forgotten = folded = 0
    kind = "expiry" if args.expiry and args.kind in ("all", "random") else args.kind
    schedules = 0
    by_kind: dict[str, int] = {}
    for seed in seeds:
        kinds = [kind] if kind != "all" else ["random", CASE_KINDS[seed % len(CASE_KINDS)]]
        for one in kinds:
            schedules += 1
            by_kind[one] = by_kind.get(one, 0) + 1
            try:
                result = run(seed, replicas=args.replicas, events=args.events, kind=one)
            except InvariantViolation as violation:
                violations.append(violation)
                log.error("%s", violation)
                continue
            if args.seed is not None:
                print(one, result)
            if one in ("random", "expiry"):
                worst_excess = max(worst_excess, result.worst_excess)
                worst_ratio = max(worst_ratio, result.worst_ratio)
                lag = max(lag, result.max_lag_ns)
                granted += result.granted
            refused += result.refused
            restarts += result.restarts
            forgotten += result.forgotten
            folded += result.folded
    elapsed = time.perf_counter() - started
    kinds_run = ", ".join(f"{count} {name}" for name, count in by_kind.items())
    print(
        f"{schedules} schedules ({kinds_run}) in {elapsed:.1f}s, {len(violations)} violations; "
        f"{granted} tokens granted; worst admitted / (C + r·D) = {worst_ratio:.3f}; "
        f"worst share of the error budget (B) used = {worst_excess:.3f}; "
        f"largest information lag {lag / MS:.1f} ms"
        + (
            f"; {refused} PATCHes refused, {restarts} restarts, {forgotten} tokens forgotten "
            "by restarts without a snapshot"
            if refused or restarts
            else ""
        )
        + (f"; {folded} entries of retired incarnations folded" if folded else "")
    )
    return 1 if violations else 0


if __name__ == "__main__":  # also reachable as `bucketmesh sim`
    sys.exit(main())

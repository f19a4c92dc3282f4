"""The replicated token bucket: its state, its math and its merge, in one place.

Theory of operation
-------------------
Every region holds a replica of each bucket and decides locally from its own
view; replicas exchange *deltas* and merge them. A bucket's state is a product
of join-semilattices, joined part by part, so merge is commutative,
associative and idempotent, and duplicated, reordered or re-sent deltas do no
harm:

``epoch``
    The bucket's generation (integer ns, see "Garbage" below). States of a
    higher epoch replace states of a lower one wholesale (a lexicographic
    product: a total order over a lattice is still a lattice).
``config`` = (capacity C, emission interval T ns/token, ttl, mode, version)
    A last-writer-wins register ordered by ``version`` = (hybrid logical
    clock, origin). Rules loaded at start-up have clock 0; ``configure``
    (PATCH) stamps a fresh HLC value, so a runtime change beats the file.
``used[replica]``
    Tokens ever consumed at that replica in this epoch: a grow-only counter,
    merged by per-entry max. Only the owner writes its entry.
``base`` = (version, time f, used u)
    A max-register ordered by (version, f − u·T, f): "full at f when u tokens
    had been spent". A generation starts with (file version, epoch, 0); a
    config change proposes a new one (below). Grants never move it.
``records[replica]`` (History)
    Exact samples of the owner's monotone function before_q(s) = tokens q spent
    before s: its **anchor** (the instant of its latest grant on a bucket that
    was full in its view, the count then, and the count when that slice
    began) and its **marks** (instant m of its first grant in a slice, count
    before m) for the slices it granted in. Slices have length
    S = max(C·T/8, 10 ms) and are aligned to the epoch, so every replica cuts
    time at the same instants. A mark is written
    at the owner's first grant of a slice (never changed afterwards), except
    where the anchor already says it. Joined per replica: anchor by latest
    instant, marks by union keeping the oldest and the newest 63
    (commutative, associative, idempotent).

GCRA form, in integer nanoseconds and integer tokens. GCRA over a merged
arrival sequence is Lindley's recursion: TAT = max over arrivals i of
(t_i + T·U(≥t_i)), U(≥s) the tokens spent at or after s by every replica.
The maximum is reached where a busy period began, and every busy period
begins where some replica found the bucket full in its own view — its
anchor. The state evaluates the same max over the points it holds::

    Û_q(≥s) = used_q − before_q(q's first record at or after s)   (0 if none)
    TAT  = max( f + T·(Σused − u),
                max over record points s ≥ f of  s + T·Σ_q Û_q(≥s) )
    L(t) = C − ceil(max(0, TAT − t) / T)             level; never above C
    acquire n at t:  allowed  ⇔  L(t) ≥ n  ⇔  max(0, TAT − t) + n·T ≤ C·T
                     if TAT < t: anchor := (t, used_self, ...)      (was full)
                     if t opens a slice: mark := (t, used_self)
                     then used[self] += n
    retry_after(n) = max(0, TAT + n·T − C·T − t)
    reset_after    = max(0, TAT − t)                 until the bucket is full

Û never exceeds the true U (a later sample only says more was spent before
it), so TAT never exceeds the GCRA TAT of the real merged history: no grant is
charged twice and refill that paid for a grant is never forgotten (the
single max-register ``base`` of earlier versions charged every token the busy
side of a partition spent before the quiet side's last re-base again — a
debt of the busy side's whole spend). At the earliest first grant m of any
replica in a slice, every replica's first record at or after m is exact
(each marked its own first grant there; one that did not grant there spent
nothing before its next record), so TAT ≥ TAT_true − S: over-admission
of at most one slice of refill (S/T ≤ max(C/8, r·10 ms) tokens) beyond the
connected bound. A bucket only one replica touched has only its own records,
its anchor is GCRA's re-base, and decisions are exact GCRA. The TAT is
cached (``g``/``unc``) and recomputed only when records change, so a
decision stays O(1).

Because ``T`` is an integer carried inside ``config``, two replicas holding
the same state compute the same level at the same instant, bit for bit. A
delta is "my entry of ``used`` is now N, my records are R, ``base`` is B,
``config`` is K": absolute values, never increments, so a later delta
subsumes an earlier one.

Config changes keep the level at the change instant: the replica adopting
version v proposes ``base = (v, t + backlog, Σused)`` such that L(t) under the
new config equals min(L(t) under the old one, new C) — raising capacity never
refills the bucket for free — with the backlog clamped to 1e18 ns, so every
stored time stays within int64. Records before the base no longer count;
tokens spent but unknown at the change are charged after it (the safe side).
``base`` of a higher version dominates, so replicas converge in whatever
order they learn things. A replica that learns a newer config from a peer
adopts it the same way before merging (the limiter does it).

Error terms (documented, measured in the simulator and benchmarks, not hidden)
-----------------------------------------------------------------------------
* Connected, one-way delay d, n regions: over-admission is at most about
  (n−1)·(C + r·d) + S/T in the worst case (each region may spend what it has
  not yet heard the others spend; S/T from the slice resolution) and far less
  under steady traffic.
* A partition of k groups lasting P admits up to (k−1)·(C + r·P) extra
  (local-only mode). After healing, the merged state puts the bucket into
  debt equal to that over-admission, within one slice of refill, which refill
  repays, so the long-run total matches the limit from above and below.
  History older than a replica's 64 kept marks resolves liberally (only the
  oldest mark and the anchors stay exact).
* Clock skew ε between regions: about r·ε tokens. A clock that ran ahead by ε
  and is corrected leaves its records ε in the future: up to r·ε of debt.

Garbage
-------
A bucket full for longer than its ttl (TAT + ttl ≤ now) may be dropped:
dropping a full bucket is the same as keeping it for *local* decisions, but
its ``used`` entries are gone, so a re-created bucket must not be merged
with the old generation (the owner's counter would restart below the max
others still hold, hiding new consumption). Hence ``epoch``: a bucket
created at t gets epoch ``t − t mod ttl``. Replicas that create a key at
about the same time agree on the epoch; a bucket can only be dropped at
least one ttl after its epoch began, so its re-creation always has a higher
epoch and replaces any stale copy instead of merging with it. A replica
still holding the older generation when the later one arrives carries its
share (mine / Σused) of the older generation's TAT beyond the new epoch's
start into the new one, as tokens spent at that start (``carry``): a
partition that straddles an epoch boundary keeps its debt, and the race is
bounded by one sync delay in every case.
A replica that dropped a generation it spent in and then learns that same
generation back from a peer restores its own entry from a tombstone the
limiter keeps (``limiter.py``), not from the peer's possibly older view.

Retired incarnations
--------------------
Every start of a node takes a new incarnation ``region/node/N``; the older ones'
entries stay. ``folds[region/node] = (W, F)`` folds that node's incarnations
below W into F tokens (counted in ``total``, without records): a record joins
by (W, F) order, entries below W are dropped and ignored when a delta brings
them back. A fold that drops records first re-bases at the TAT it finds
(``base := (version, TAT, Σused)``, a legal step up the max-register), so the
TAT is unchanged and never goes lower later. ``plan_folds`` decides what may be
folded: a retired incarnation whose entry every region holds alike; the caller
(``bucketmesh reconcile``) also makes sure no process stopped within the sync
window. docs/design.md section 3, "Retired incarnations", has the argument.

This module does no I/O and reads no clock: time is always an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, get_args

# The structs (config, decision, delta) live in ``structs.py``, which is never compiled:
# mypyc would build them without their msgspec options (frozen, array_like, gc).
from bucketmesh.core.heap import untrack
from bucketmesh.core.structs import BucketConfig as BucketConfig
from bucketmesh.core.structs import BucketDelta as BucketDelta
from bucketmesh.core.structs import Decision as Decision
from bucketmesh.core.structs import Version as Version

# The modes, defined once: the wire structs' type (and the OpenAPI enum), the
# validator (core.limits) and the code all read them from here.
ModeName = Literal["shared", "strict", "local"]
MODES: Final[tuple[str, ...]] = get_args(ModeName)
SHARED: Final = "shared"
STRICT: Final = "strict"
LOCAL: Final = "local"

NS_PER_S: Final = 1_000_000_000


def interval_for(refill_rate: float) -> int:
    """The integer emission interval for a rate in tokens per second (at least 1 ns)."""
    if not refill_rate > 0:
        raise ValueError(f"refill rate must be > 0, got {refill_rate}")
    return max(1, round(NS_PER_S / refill_rate))


class Hlc:
    """Hybrid logical clock: stamps strictly above every stamp seen, near wall time."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def tick(self, now_ns: int) -> int:
        self.last = now_ns if now_ns > self.last else self.last + 1
        return self.last

    def observe(self, stamp: int) -> None:
        if stamp > self.last:
            self.last = stamp


def epoch_for(now_ns: int, ttl_ns: int) -> int:
    return now_ns - now_ns % ttl_ns


ABSENT: Final = -(2**63) - 1
"""``Bucket._anchor`` and ``Bucket._unc`` when there is none (None to their readers):
below every int64, so never a time (every stored time fits int64: msgpack)."""

MARKS_KEPT: Final = 64
"""Marks (per replica) a bucket keeps: the oldest (where its history in this
generation begins) and the newest 63 slices that replica granted in."""

MIN_SLICE_NS: Final = 10_000_000
"""The shortest slice (10 ms): marks are written at most once per slice per replica."""

MAX_BACKLOG_NS: Final = 10**18
"""The longest backlog (TAT − now) a config change carries over: ~31.7 years. Every
time the state stores is now + at most this, so it stays inside int64 (msgpack)."""


def slice_ns(config: BucketConfig) -> int:
    """The slice length S of ``config``: an eighth of the time a drained bucket takes
    to refill (C·T/8), at least 10 ms. Slices are aligned to the epoch, so every
    replica cuts time at the same instants."""
    span = config.capacity * config.interval_ns // 8
    return span if span > MIN_SLICE_NS else MIN_SLICE_NS


def _join_marks(
    a: Sequence[int] | None, b: Sequence[int] | None, epoch: int, slice_len: int
) -> tuple[int, ...] | None:
    """keep(a ∪ b): the union of two copies of one replica's marks, of which the
    oldest and the newest MARKS_KEPT − 1 are kept — a function of the union alone,
    so the join is commutative, associative and idempotent. Two
    marks at one point keep the smaller count (they are equal when both are
    exact). ``epoch`` and ``slice_len`` are unused today; they let the kept set
    depend on slice positions (thinning) without changing callers."""
    pairs: dict[int, int] = {}
    for marks in (a, b):
        if marks:
            for i in range(0, len(marks) - 1, 2):
                point, before = marks[i], marks[i + 1]
                known = pairs.get(point)
                if known is None or before < known:
                    pairs[point] = before
    if not pairs:
        return None
    points = sorted(pairs)
    if len(points) > MARKS_KEPT:
        # the oldest stays (where a long busy period began), then the newest
        points = [points[0], *points[len(points) - MARKS_KEPT + 1 :]]
    out: list[int] = []
    for point in points:
        out.append(point)
        out.append(pairs[point])
    return tuple(out)


_EDGES: dict[int, int] = {}


def _shared_edge(edge: int) -> int:
    """One int object per slice end: buckets granted in the same slice share it (a
    bucket is ~300 bytes; an int is 32)."""
    shared = _EDGES.get(edge)
    if shared is None:
        if len(_EDGES) > 256:
            _EDGES.clear()
        shared = _EDGES[edge] = edge
    return shared


Entries = list[Any]
"""The other replicas' entries, flat: for each, ``STRIDE`` items [replica id, used,
anchor time or None, used at the anchor, marks or None, used at the start of the
anchor's slice], in the order they were learnt. One list, not a dict of lists: a
restarted node holds its previous incarnation's entry in every bucket, and a dict of
one entry (184 B) and its list (104 B) would cost a million buckets ~290 MB where
this list costs ~105 MB. A bucket holds few entries (one per replica that spent in
it), so a lookup is a short scan.

A bucket whose one other entry is all it holds — no records of its own, a single other
replica's entry (the usual state of a bucket restored under a new incarnation, or
learnt from a peer and not granted here) — holds no list at all: ``Bucket._entries``
is that replica's id (a ``str``) and the bucket's own record slots hold that entry's
records (``Bucket`` "Lone entry")."""

STRIDE: Final = 6


def _find(entries: Entries, rid: str) -> int:
    """The index of ``rid``'s entry in ``entries``, or -1."""
    for i in range(0, len(entries), STRIDE):
        if entries[i] == rid:
            return i
    return -1


def _records(
    epoch: int,
    slice_len: int,
    anchor: int | None,
    anchor_used: int,
    anchor_slice: int,
    marks: Sequence[int] | None,
    floor: int,
) -> dict[int, int]:
    """One replica's records as point -> used before it: its marks, its anchor, and the
    start of the anchor's slice (``anchor_slice``: what it had used when that slice
    began, or more if a mark for that slice says less). Only points at or after
    ``floor`` (the base) count."""
    out: dict[int, int] = {}
    if marks:
        for i in range(0, len(marks) - 1, 2):
            point = marks[i]
            if point >= floor:
                before = marks[i + 1]
                known = out.get(point)
                if known is None or before < known:
                    out[point] = before
    if anchor is not None and anchor >= floor:
        for point, before in (
            (anchor, anchor_used),
            (anchor - (anchor - epoch) % slice_len, anchor_slice),
        ):
            if point >= floor:
                known = out.get(point)
                if known is None or before < known:
                    out[point] = before
    return out


class Bucket:
    """One replica's view of one bucket. ``mine`` is this replica's entry of ``used``.

    ``total`` caches Σ used. The merged TAT is cached as ``g`` (the largest term
    this replica's own grants still raise, minus T·Σused) and ``unc`` (the largest
    term they no longer raise, absolute; None when none), so a decision is O(1):
    TAT = max(g + T·total, unc). Both are recomputed (``_recompute``) when the
    records change: on a merge, a config change, and a grant that re-bases or
    opens a slice while another replica's records are held. A bucket no other
    replica touched keeps exact GCRA with no sweep at all.

    Memory: other replicas' entries are held in ``_entries``: None, or one flat list
    (``Entries``). A bucket that never leaves its region holds only its anchor (two
    ints, held inline: ``anchor``) beyond what it held before.

    Lone entry: a bucket with no records of its own (no anchor, no marks) and exactly
    one other replica's entry holds that entry in place of its own records: its
    ``_entries`` is the other replica's id (a ``str``), ``_anchor``,
    ``_anchor_used``, ``_anchor_slice`` and ``_marks`` are that replica's records,
    and its count is ``total − mine − folded_total()`` (``total`` counts every
    entry). That is what a restart leaves in every bucket the previous incarnation
    touched (its entry, nothing of the new one's): held so, it costs no list (104 B)
    and no boxed anchor (32 B) beside the bucket. It is a representation only: the
    state is the same as with the list (``entries``, ``others``, ``full_state``
    and ``delta`` say so), ``g`` and ``unc`` are the same, and ``edge`` is 0 (no
    records of its own), so the first grant takes the slow path, which unpacks the
    entry into a list (``_unpack``) before its records move; so does every other
    write but ``raise_own``. ``_pack`` folds a bucket back into this form after a
    decode (``_replace``), a merge, a fold or a config change leaves it eligible.
    The public ``anchor``, ``anchor_used``, ``anchor_slice`` and ``marks`` always
    read this replica's own records (none here).
    """

    __slots__ = (
        "_anchor",
        "_anchor_slice",
        "_anchor_used",
        "_config",
        "_entries",
        "_marks",
        "_unc",
        "base_time",
        "base_used",
        "base_version",
        "capacity",
        "edge",
        "epoch",
        "folds",
        "g",
        "interval",
        "mine",
        "mode",
        "rule",
        "total",
    )

    def __init__(self, config: BucketConfig, now_ns: int, rule: str = "") -> None:
        # lives as long as its key and is in no reference cycle: out of the cyclic
        # collector's walks where compiled (core/heap.py); so is its entries list
        untrack(self)
        self.config = config
        self.epoch = epoch_for(now_ns, config.ttl_ns)
        self.base_version = config.version
        self.base_time = self.epoch  # TAT = epoch ≤ now: a new bucket is full
        self.base_used = 0
        self.mine = 0
        self._entries: Entries | str | None = None
        self.total = 0
        self.rule = rule
        self._anchor = ABSENT
        self._anchor_used = 0
        self._anchor_slice = 0
        self._marks: tuple[int, ...] | None = None
        self.edge = 0
        self.g = self.epoch
        self._unc = ABSENT
        self.folds: dict[str, tuple[int, int]] | None = None

    @property
    def config(self) -> BucketConfig:
        """This generation's limits. Setting it also sets ``capacity``, ``interval`` and
        ``mode``, its fields a decision reads (plain attributes: in the compiled build a
        read of a msgspec field is a generic attribute lookup, ~200 instructions)."""
        return self._config

    @config.setter
    def config(self, config: BucketConfig) -> None:
        self._config = config
        self.capacity = config.capacity
        self.interval = config.interval_ns
        self.mode = config.mode

    @property
    def anchor(self) -> int | None:
        """The instant of this replica's latest grant on a bucket that was full in its
        view, or None. Held as a plain int (``ABSENT`` for None): in the compiled
        build an ``int | None`` attribute is a boxed object, a fresh 32-byte int per
        bucket, where a native int is held inline (docs/build.md, "Layout")."""
        anchor = self._anchor
        return None if anchor == ABSENT or isinstance(self._entries, str) else anchor

    @anchor.setter
    def anchor(self, anchor: int | None) -> None:
        self._unpack()
        self._anchor = ABSENT if anchor is None else anchor

    @property
    def anchor_used(self) -> int:
        """This replica's count at its anchor (0 without one)."""
        return 0 if isinstance(self._entries, str) else self._anchor_used

    @anchor_used.setter
    def anchor_used(self, value: int) -> None:
        self._unpack()
        self._anchor_used = value

    @property
    def anchor_slice(self) -> int:
        """This replica's count when its anchor's slice began (0 without an anchor)."""
        return 0 if isinstance(self._entries, str) else self._anchor_slice

    @anchor_slice.setter
    def anchor_slice(self, value: int) -> None:
        self._unpack()
        self._anchor_slice = value

    @property
    def marks(self) -> tuple[int, ...] | None:
        """This replica's marks (point, count before it, ...), or None."""
        return None if isinstance(self._entries, str) else self._marks

    @marks.setter
    def marks(self, marks: tuple[int, ...] | None) -> None:
        self._unpack()
        self._marks = marks

    @property
    def unc(self) -> int | None:
        """The largest TAT term this replica's own grants no longer raise, or None
        (held as a plain int, ``ABSENT`` for None, as ``anchor``)."""
        unc = self._unc
        return None if unc == ABSENT else unc

    # -- the lone entry (see the class's docstring) ------------------------------------

    def _lone_entry(self, rid: str) -> Entries:
        """The lone entry of ``rid`` as a list (``Entries``) of one entry."""
        anchor = self._anchor
        return [
            rid,
            self.total - self.mine - self.folded_total(),
            None if anchor == ABSENT else anchor,
            self._anchor_used,
            self._marks,
            self._anchor_slice,
        ]

    def _unpack(self) -> None:
        """A lone entry into a list of one entry, the record slots back to this
        replica's own (none). The state, ``g``, ``unc`` and ``edge`` (0) are unchanged."""
        rid = self._entries
        if not isinstance(rid, str):
            return
        self._entries = untrack(self._lone_entry(rid))
        self._anchor = ABSENT
        self._anchor_used = 0
        self._anchor_slice = 0
        self._marks = None

    def _unpacked(self) -> Entries | None:
        """``_entries`` as a list (a lone entry unpacked first), or None."""
        self._unpack()
        entries = self._entries
        return None if isinstance(entries, str) else entries

    def _pack(self) -> None:
        """Hold a single other entry as a lone entry, if this replica has no records
        (and so ``edge`` 0) and the entry's count is what ``total`` leaves for it."""
        entries = self._entries
        if (
            entries is None
            or isinstance(entries, str)
            or len(entries) != STRIDE
            or self._anchor != ABSENT
            or self._marks
            or self.edge != 0
        ):
            return
        rid = entries[0]
        if not isinstance(rid, str) or entries[1] != self.total - self.mine - self.folded_total():
            return  # (never: ``total`` counts every entry) — keep the list, never a count
        anchor = entries[2]
        self._entries = rid
        self._anchor = ABSENT if anchor is None else anchor
        self._anchor_used = entries[3]
        self._marks = entries[4]
        self._anchor_slice = entries[5]

    # -- reading -------------------------------------------------------------

    @property
    def entries(self) -> Entries | None:
        """The other replicas' entries, flat (``Entries``), or None. To read only: a
        lone entry is given as a new list."""
        entries = self._entries
        if isinstance(entries, str):
            return self._lone_entry(entries)
        return entries

    @property
    def others(self) -> dict[str, int] | None:
        """The other replicas' entries of ``used`` (a copy), or None if none is known."""
        entries = self._entries
        if entries is None:
            return None
        if isinstance(entries, str):
            return {entries: self.total - self.mine - self.folded_total()}
        return {entries[i]: entries[i + 1] for i in range(0, len(entries), STRIDE)}

    def tat(self) -> int:
        tat = self.g + self.total * self.config.interval_ns
        unc = self._unc
        return unc if unc != ABSENT and unc > tat else tat

    def level(self, now_ns: int) -> int:
        """Whole tokens available at ``now_ns``; negative while in debt after a partition."""
        interval = self.config.interval_ns
        backlog = self.tat() - now_ns
        if backlog <= 0:
            return self.config.capacity
        return self.config.capacity - (-(-backlog // interval))

    def retry_after_ns(self, tokens: int, now_ns: int) -> int:
        cfg = self.config
        wait = self.tat() + tokens * cfg.interval_ns - cfg.capacity * cfg.interval_ns - now_ns
        return wait if wait > 0 else 0

    def reset_after_ns(self, now_ns: int) -> int:
        backlog = self.tat() - now_ns
        return backlog if backlog > 0 else 0

    def expired(self, now_ns: int) -> bool:
        """Full for longer than its ttl: safe to drop (see "Garbage" above)."""
        return self.tat() + self.config.ttl_ns <= now_ns

    def used(self, replica_id: str) -> dict[str, int]:
        entries = self.others or {}
        if self.mine or not entries:
            entries[replica_id] = self.mine
        return entries

    # -- the merged TAT --------------------------------------------------------

    def _recompute(self) -> None:
        """TAT = max(base term, max over record points s of s + T·Σ_q Û_q(≥s)), where
        Û_q(≥s) = used_q − (used before q's first record at or after s), or 0 if q
        has none: a sweep over every replica's records, newest first."""
        cfg = self.config
        interval = cfg.interval_ns
        epoch = self.epoch
        # Records count from the base on: from the epoch itself for a generation's
        # first base, strictly after a config change's (a grant at that very instant
        # is already in the backlog the change carried over).
        floor = self.base_time if self.base_time == epoch else self.base_time + 1
        slice_len = slice_ns(cfg)
        total = self.total
        g = self.base_time - self.base_used * interval
        stored = self._entries
        if isinstance(stored, str):  # a lone entry: none of our own records
            own: dict[int, int] = {}
            entries: Entries | None = self._lone_entry(stored)
        else:
            own = _records(
                epoch,
                slice_len,
                self.anchor,
                self._anchor_used,
                self._anchor_slice,
                self._marks,
                floor,
            )
            entries = stored
        if not entries:
            # Σused − mine: what folded incarnations spent (0 without folds), before
            # every record of ours, as they no longer run
            others = total - self.mine
            for point, before in own.items():
                term = point - (before + others) * interval
                if term > g:
                    g = term
            self.g = g
            self._unc = ABSENT
            return
        last = max(own) if own else None
        events: list[tuple[int, int, int]] = [(p, 0, b) for p, b in own.items()]
        current = [self.mine]
        for index, i in enumerate(range(0, len(entries), STRIDE), 1):
            current.append(entries[i + 1])
            records = _records(
                epoch,
                slice_len,
                entries[i + 2],
                entries[i + 3],
                entries[i + 5],
                entries[i + 4],
                floor,
            )
            for p, b in records.items():
                events.append((p, index, b))
        events.sort(reverse=True)
        spent_before = total  # Σ_q (used before q's next record), none passed yet
        unc: int | None = None
        n = len(events)
        i = 0
        while i < n:
            point = events[i][0]
            while i < n and events[i][0] == point:
                _, q, before = events[i]
                spent_before += before - current[q]
                current[q] = before
                i += 1
            if last is not None and point <= last:
                term = point - spent_before * interval
                if term > g:
                    g = term
            else:
                term = point + (total - spent_before) * interval
                if unc is None or term > unc:
                    unc = term
        self.g = g
        self._unc = ABSENT if unc is None else unc

    def _note(self, now_ns: int, rebase: bool) -> None:
        """Record a grant that re-bases (the bucket was full) or opens a new slice (never
        on a lone entry: ``acquire`` unpacks it first)."""
        slice_len = slice_ns(self.config)
        epoch = self.epoch
        start = now_ns - (now_ns - epoch) % slice_len
        if rebase:
            anchor = self._anchor
            begun_with = self.mine
            if anchor != ABSENT:
                begun = anchor - (anchor - epoch) % slice_len
                if begun == start:
                    begun_with = self._anchor_slice  # the same slice: its start stays
                else:
                    # The old anchor stood for its slice's mark too: keep that mark.
                    marks = self._marks
                    if not marks or not any(
                        begun <= point < begun + slice_len for point in marks[0::2]
                    ):
                        self._marks = _join_marks(
                            marks, (begun, self._anchor_slice), epoch, slice_len
                        )
            self._anchor = now_ns
            self._anchor_used = self.mine
            self._anchor_slice = begun_with
        else:
            # at the grant's own instant: exact, and tighter than the slice's start
            self._marks = _join_marks(self._marks, (now_ns, self.mine), epoch, slice_len)
        if start + slice_len > self.edge:
            self.edge = _shared_edge(start + slice_len)

    def _derive_edge(self) -> None:
        """``edge``: the end of the slice of this replica's newest record (0 if none);
        a grant at or past it opens a slice. A function of the state alone."""
        newest = self.anchor
        marks = self.marks
        if marks and (newest is None or marks[-2] > newest):
            newest = marks[-2]
        if newest is None:
            self.edge = 0
            return
        slice_len = slice_ns(self.config)
        self.edge = _shared_edge(newest - (newest - self.epoch) % slice_len + slice_len)

    def share_ids(self, shared: dict[Any, Any]) -> None:
        """Replace the other replicas' ids with the equal ones in ``shared`` (adding
        those it lacks): decoded buckets share one copy of each id."""
        entries = self._entries
        if isinstance(entries, str):
            self._entries = shared.setdefault(entries, entries)
        elif entries:
            for i in range(0, len(entries), STRIDE):
                rid = entries[i]
                entries[i] = shared.setdefault(rid, rid)

    # -- writing -------------------------------------------------------------

    def acquire(self, key: str, tokens: int, now_ns: int) -> Decision:
        """Take ``tokens`` if the level allows (``tokens == 0`` only peeks) and say so.

        The records move only when a grant is made on a full bucket or in a new
        slice, so a denied request or a peek never changes the replicated state.
        This is the hot path: integer math, one allocation (the Decision).
        """
        interval = self.interval
        capacity = self.capacity
        tat = self.g + self.total * interval
        unc = self._unc
        if unc != ABSENT and unc > tat:
            tat = unc
        backlog = tat - now_ns  # TAT − t; negative: full since then
        need = tokens * interval
        # backlog⁺ + n·T > C·T, as a floor division (x > C·T ⇔ (x − 1) // T ≥ C): the
        # compiled build multiplies ints of 2^30 and more, a large C, on a slow path
        if ((backlog if backlog > 0 else 0) + need - 1) // interval >= capacity:
            return Decision(
                False,
                key,
                capacity - (-(-backlog // interval)) if backlog > 0 else capacity,
                capacity,
                NS_PER_S / interval,
                ((backlog if backlog > 0 else 0) + need - capacity * interval) / NS_PER_S,
                backlog / NS_PER_S if backlog > 0 else 0.0,
                self.mode,
                self.rule,
            )
        if tokens > 0:
            if backlog < 0 or now_ns >= self.edge:
                if isinstance(self._entries, str):
                    self._unpack()  # our first record: the lone entry goes to a list
                rebase = backlog < 0
                anchor = self._anchor
                marks = self._marks
                if (
                    rebase
                    and now_ns < self.edge
                    and anchor != ABSENT
                    and anchor <= now_ns
                    and (not marks or marks[-2] <= anchor)
                ):
                    # a re-base in the slice of our newest record, the anchor: the
                    # slice's start count stays (the common case of a lightly used key;
                    # not before the anchor: after a clock stepped back, ``_note`` keeps
                    # the later slice's mark, so the edge stays what the state derives)
                    self._anchor = now_ns
                    self._anchor_used = self.mine
                else:
                    self._note(now_ns, rebase)
                self.mine += tokens
                self.total += tokens
                if self._entries is None:
                    # Alone: a re-base is exact GCRA (TAT := now + n·T), if the grant
                    # is at or after ``_recompute``'s floor (the base); a new slice's
                    # mark lies below the TAT already held (docs/design.md section 3).
                    # A re-base before the floor (a base a peer's config change or a
                    # fold set ahead of the TAT, or the epoch, after a clock skew) is a
                    # record that counts for nothing: the sweep decides, so the TAT
                    # stays a function of the state (a restored copy computes it alike).
                    if rebase:
                        base_time = self.base_time
                        if now_ns > base_time or (now_ns == base_time == self.epoch):
                            spent = self.total - tokens
                            # (the anchor's own int object when nothing was spent before)
                            self.g = now_ns - spent * interval if spent else now_ns
                        else:
                            self._recompute()
                else:
                    self._recompute()
            else:
                self.mine += tokens
                self.total += tokens
            # The answer is the level as GCRA takes it (the same whichever replica
            # grants); the merged TAT may be below it when others' records are later.
            backlog = (backlog if backlog > 0 else 0) + need
        return Decision(
            True,
            key,
            capacity - (-(-backlog // interval)) if backlog > 0 else capacity,
            capacity,
            NS_PER_S / interval,
            0.0,
            backlog / NS_PER_S if backlog > 0 else 0.0,
            self.mode,
            self.rule,
        )

    def acquire_run(self, key: str, tokens: int, count: int, now_ns: int) -> list[Decision]:
        """``[self.acquire(key, tokens, now_ns) for _ in range(count)]``, decided alike.

        A batch asking one key again and again (``Limiter.acquire_many``): after
        the first ask, a grant that neither re-bases nor starts a slice only adds
        to ``mine`` and ``total``, so it is decided here without the call; a
        denial or a peek changes nothing, so every later ask gets the same
        (frozen) answer; anything else goes through ``acquire``.
        """
        first = self.acquire(key, tokens, now_ns)
        out = [first]
        if count < 2:
            return out
        if not first.allowed or tokens <= 0:
            out *= count
            return out
        interval = self.interval
        capacity = self.capacity
        limit = capacity * interval
        need = tokens * interval
        rate = NS_PER_S / interval
        mode = self.mode
        rule = self.rule
        keep = out.append
        for _ in range(count - 1):
            tat = self.g + self.total * interval
            unc = self._unc
            if unc != ABSENT and unc > tat:
                tat = unc
            backlog = tat - now_ns
            if backlog < 0 or now_ns >= self.edge:
                keep(self.acquire(key, tokens, now_ns))
                continue
            backlog += need
            if backlog > limit:
                denied = self.acquire(key, tokens, now_ns)
                out.extend([denied] * (count - len(out)))
                return out
            self.mine += tokens
            self.total += tokens
            keep(
                Decision(
                    True,
                    key,
                    capacity - (-(-backlog // interval)),
                    capacity,
                    rate,
                    0.0,
                    backlog / NS_PER_S,
                    mode,
                    rule,
                )
            )
        return out

    def acquire_into(
        self,
        key: str,
        tokens: int,
        count: int,
        now_ns: int,
        allowed: list[bool],
        remaining: list[int],
        retry_after: list[float],
        reset_after: list[float],
    ) -> None:
        """``acquire_run`` written as columns: appends, per ask, whether it is allowed,
        the tokens remaining, retry_after and reset_after (the rest of each decision —
        key, capacity, refill rate, mode, rule — is the bucket's; the caller writes it).

        Decided alike, step for step, the values computed as ``acquire`` computes
        them: a grant that neither re-bases nor starts a slice only adds to ``mine``
        and ``total``; a grant that does is ``acquire``'s own step (the records move
        there; its Decision is not read); a denial or a peek changes nothing, so its
        answer is written once for every ask left.
        """
        interval = self.interval
        capacity = self.capacity
        need = tokens * interval
        done = 0
        granted = 0  # grants of this stretch whose allowed and retry_after are not written
        while done < count:
            tat = self.g + self.total * interval
            unc = self.unc
            if unc is not None and unc > tat:
                tat = unc
            backlog = tat - now_ns
            after = (backlog if backlog > 0 else 0) + need
            if (after - 1) // interval >= capacity or tokens <= 0:
                if granted:
                    _write_grants(granted, allowed, retry_after)
                left = count - done
                if tokens > 0 or (after - 1) // interval >= capacity:  # denied
                    allowed.extend([False] * left)
                    remaining.extend(
                        [capacity - (-(-backlog // interval)) if backlog > 0 else capacity] * left
                    )
                    retry_after.extend([(after - capacity * interval) / NS_PER_S] * left)
                    reset_after.extend([backlog / NS_PER_S if backlog > 0 else 0.0] * left)
                else:  # a peek
                    allowed.extend([True] * left)
                    remaining.extend(
                        [capacity - (-(-after // interval)) if after > 0 else capacity] * left
                    )
                    retry_after.extend([0.0] * left)
                    reset_after.extend([after / NS_PER_S if after > 0 else 0.0] * left)
                return
            if backlog < 0 or now_ns >= self.edge:
                self.acquire(key, tokens, now_ns)  # a re-base or a new slice: the records move
            else:
                self.mine += tokens
                self.total += tokens
            remaining.append(capacity - (-(-after // interval)))
            reset_after.append(after / NS_PER_S)
            granted += 1
            done += 1
        if granted:
            _write_grants(granted, allowed, retry_after)

    def reconfigure(self, config: BucketConfig, now_ns: int) -> None:
        """Adopt a newer config, proposing the ``base`` that keeps the level at ``now_ns``.

        The backlog (time until full) is carried over in tokens, with the
        capacity delta added; ceil keeps the rounding on the safe side. It is
        clamped to [0, MAX_BACKLOG_NS], so the base stays a time near now.
        """
        old = self.config
        backlog_old = self.tat() - now_ns
        if backlog_old < 0:
            backlog_old = 0
        # tokens missing, old rate → new rate; then the capacity change (clamped at full)
        backlog = -(-backlog_old * config.interval_ns // old.interval_ns)
        backlog += (config.capacity - old.capacity) * config.interval_ns
        if backlog < 0:
            backlog = 0
        elif backlog > MAX_BACKLOG_NS:
            backlog = MAX_BACKLOG_NS
        self.config = config
        self.base_version = config.version
        self.base_time = now_ns + backlog
        self.base_used = self.total
        self._derive_edge()
        self._recompute()

    def delta(self, key: str, replica_id: str) -> BucketDelta:
        """This replica's own entry, with ``base`` and ``config``: what a sync push carries."""
        anchor = self.anchor
        return BucketDelta(
            key,
            self.epoch,
            self.config,
            self.base_version,
            self.base_time,
            {replica_id: self.mine},
            self.rule,
            self.base_used,
            {} if anchor is None else {replica_id: anchor},
            {} if anchor is None else {replica_id: self.anchor_used},
            {} if anchor is None else {replica_id: self.anchor_slice},
            {replica_id: self.marks} if self.marks else {},
        )

    def full_state(self, key: str, replica_id: str) -> BucketDelta:
        """Every entry known here: for repair, new peers and snapshots."""
        at: dict[str, int] = {}
        used: dict[str, int] = {}
        begun: dict[str, int] = {}
        marks: dict[str, tuple[int, ...]] = {}
        if self.anchor is not None:
            at[replica_id] = self.anchor
            used[replica_id] = self.anchor_used
            begun[replica_id] = self.anchor_slice
        if self.marks:
            marks[replica_id] = self.marks
        entries = self.entries
        if entries is not None:
            for i in range(0, len(entries), STRIDE):
                rid = entries[i]
                if entries[i + 2] is not None:
                    at[rid], used[rid], begun[rid] = entries[i + 2], entries[i + 3], entries[i + 5]
                if entries[i + 4]:
                    marks[rid] = entries[i + 4]
        return self._encoded(key, self.used(replica_id), at, used, begun, marks)

    def _encoded(
        self,
        key: str,
        used: dict[str, int],
        anchor_at: dict[str, int],
        anchor_used: dict[str, int],
        anchor_begun: dict[str, int],
        marks: dict[str, tuple[int, ...]],
    ) -> BucketDelta:
        return BucketDelta(
            key,
            self.epoch,
            self.config,
            self.base_version,
            self.base_time,
            used,
            self.rule,
            self.base_used,
            anchor_at,
            anchor_used,
            anchor_begun,
            marks,
            dict(self.folds) if self.folds else {},
        )

    def raise_own(self, value: int) -> None:
        """Our own entry is at least ``value`` (what we spent in this epoch before
        dropping the bucket; see Limiter's tombstones). Without records: only the
        base term charges it, the safe side."""
        if value > self.mine:
            self.total += value - self.mine
            self.mine = value

    def charge(self, tokens: int, at_ns: int) -> None:
        """Record ``tokens`` as spent here at ``at_ns`` (a mark exactly there), without a
        level check: a replaced generation's carried debt."""
        self._unpack()
        slice_len = slice_ns(self.config)
        self._marks = _join_marks(self._marks, (at_ns, self.mine), self.epoch, slice_len)
        edge = at_ns - (at_ns - self.epoch) % slice_len + slice_len
        if edge > self.edge:
            self.edge = edge
        self.mine += tokens
        self.total += tokens
        self._recompute()

    def _base_key(self, version: Version, time: int, used: int) -> tuple[Version, int, int]:
        return (version, time - used * self.config.interval_ns, time)

    def carry(self, since_ns: int) -> int:
        """The tokens this replica carries into a later generation (epoch ``since_ns``)
        replacing this one: its share (mine / Σused, rounded up) of this generation's
        TAT beyond the new epoch's start — the backlog standing then plus what was
        spent here after it, which the new generation never saw."""
        backlog = self.tat() - since_ns
        if backlog <= 0 or not self.mine:
            return 0
        tokens = -(-backlog // self.config.interval_ns)
        return -(-tokens * self.mine // self.total)

    def merge(self, delta: BucketDelta, replica_id: str, now_ns: int | None = None) -> bool:
        """Join ``delta`` into this state; returns whether anything changed.

        A delta of a later generation replaces this one. With ``now_ns`` (a live
        replica merging, not a replay), this replica's share of the backlog the
        replaced generation held beyond the new epoch is charged in the new one
        at the new epoch's start (``carry``), so a partition that straddles an epoch
        boundary keeps its debt (docs/design.md, "Epochs").
        """
        if delta.epoch != self.epoch:
            if delta.epoch < self.epoch:
                return False
            carried = 0 if now_ns is None else self.carry(delta.epoch)
            self._replace(delta, replica_id)
            if carried:
                self.charge(carried, delta.epoch + 1)
            return True
        changed = False
        if delta.folds and self.fold(delta.folds, replica_id):
            changed = True
        self._unpack()  # a lone entry to a list while merging; packed again at the end
        if delta.config.version > self.config.version:
            self.config = delta.config
            self._derive_edge()  # the new config's slices (a function of the state)
            changed = True
        if self._base_key(delta.base_version, delta.base_time, delta.base_used) > self._base_key(
            self.base_version, self.base_time, self.base_used
        ):
            self.base_version = delta.base_version
            self.base_time = delta.base_time
            self.base_used = delta.base_used
            changed = True
        anchors = delta.anchors if delta.anchor_at else {}
        marks = delta.marks
        rids = delta.used.keys() | anchors.keys() | marks.keys() if anchors or marks else delta.used
        for rid in rids:
            value = delta.used.get(rid, 0)
            anchor = anchors.get(rid)
            got = marks.get(rid)
            if rid == replica_id:
                # Only an echo of our own past, or our snapshot restored elsewhere.
                if value > self.mine:
                    self.total += value - self.mine
                    self.mine = value
                    changed = True
                if anchor is not None and (self.anchor is None or anchor[0] > self.anchor):
                    self.anchor, self.anchor_used, self.anchor_slice = anchor
                    changed = True
                if got:
                    joined = _join_marks(self.marks, got, self.epoch, slice_ns(self.config))
                    if joined != self.marks:
                        self.marks = joined
                        changed = True
                self._derive_edge()
                continue
            entries = self._unpacked()
            if entries is None:
                entries = []
            i = _find(entries, rid)
            if i < 0:
                if value <= 0 and anchor is None and not got:
                    continue
                if self.folds is not None and self.folded(rid):
                    continue  # a late message of a folded incarnation: already counted
                i = len(entries)
                # (a concatenation is allocated to size; extend() would over-allocate)
                entries = self._entries = untrack(entries + [rid, 0, None, 0, None, 0])  # noqa: RUF005
                changed = True
            if value > entries[i + 1]:
                self.total += value - entries[i + 1]
                entries[i + 1] = value
                changed = True
            if anchor is not None and (entries[i + 2] is None or anchor[0] > entries[i + 2]):
                entries[i + 2], entries[i + 3], entries[i + 5] = anchor
                changed = True
            if got:
                joined = _join_marks(entries[i + 4], got, self.epoch, slice_ns(self.config))
                if joined != entries[i + 4]:
                    entries[i + 4] = joined
                    changed = True
        if not self.rule and delta.rule:
            self.rule = delta.rule
        if changed:
            self._recompute()
        self._pack()
        return changed

    # -- retired incarnations (see "Retired incarnations" above) ---------------------

    def folded(self, rid: str) -> bool:
        """Whether ``rid`` is an incarnation this state has folded away."""
        folds = self.folds
        if not folds:
            return False
        node, number = incarnation_of(rid)
        fold = folds.get(node)
        return fold is not None and number is not None and number < fold[0]

    def folded_total(self) -> int:
        """The tokens the folded incarnations spent (counted in ``total``)."""
        folds = self.folds
        return sum(fold[1] for fold in folds.values()) if folds else 0

    def fold(self, folds: dict[str, tuple[int, int]], replica_id: str) -> bool:
        """Join fold records ``node -> (W, F)``: each node's incarnations below W are
        replaced by F tokens, the sum of their final entries. A record joins by
        (W, F) order, so folds merge like the rest of the state. Returns whether
        anything changed.

        Where a record newer than ours arrives, the entries it covers are dropped
        and F takes their place in ``total``. If any of them held records, the base
        is re-based at the TAT as it stood with the total as it stood (``base :=
        (version, TAT, Σused)`` before the fold: a legal step up the max-register,
        the base term never being above the TAT): every record at or before it
        becomes inert, so dropping theirs cannot lower the TAT, and what the fold
        adds to ``total`` (final counts this replica had not heard yet) and every
        token spent later is charged on top of it. A record that would cover this
        replica's own (live) incarnation is ignored."""
        own = self.folds
        mine = incarnation_of(replica_id)
        tat_before = total_before = 0
        changed = recorded = False
        for node, incoming in folds.items():
            watermark, tokens = incoming[0], incoming[1]
            known = None if own is None else own.get(node)
            if known is not None and (watermark, tokens) <= (known[0], known[1]):
                continue
            if mine[0] == node and mine[1] is not None and mine[1] < watermark:
                continue  # never fold the incarnation this replica runs as
            if not changed:
                tat_before, total_before = self.tat(), self.total
            dropped = 0
            entries = self._unpacked()
            if entries:
                kept: Entries = []
                for i in range(0, len(entries), STRIDE):
                    if below_watermark(entries[i], node, watermark):
                        dropped += entries[i + 1]
                        recorded = recorded or entries[i + 2] is not None or bool(entries[i + 4])
                    else:
                        kept = kept + entries[i : i + STRIDE]  # allocated to size
                self._entries = untrack(kept) if kept else None
            if own is None:
                own = self.folds = {}
            own[node] = (watermark, tokens)
            self.total += tokens - (0 if known is None else known[1]) - dropped
            changed = True
        if recorded:
            key = self._base_key(self.base_version, tat_before, total_before)
            if key > self._base_key(self.base_version, self.base_time, self.base_used):
                self.base_time = tat_before
                self.base_used = total_before
        if changed:
            self._recompute()
            self._pack()
        return changed

    def _replace(self, delta: BucketDelta, replica_id: str) -> None:
        self._entries = None  # (a lone entry's record slots are this replica's again)
        self.epoch = delta.epoch
        self.config = delta.config
        self.base_version = delta.base_version
        self.base_time = delta.base_time
        self.base_used = delta.base_used
        used = delta.used
        mine = self.mine = used.get(replica_id, 0)
        anchors = delta.anchors
        own_anchor = anchors.get(replica_id)
        if own_anchor is None:
            self._anchor, self._anchor_used, self._anchor_slice = ABSENT, 0, 0
        else:
            self._anchor, self._anchor_used, self._anchor_slice = own_anchor
        own_marks = delta.marks.get(replica_id)
        slice_len = slice_ns(self.config)
        self._marks = _join_marks(None, own_marks, self.epoch, slice_len)
        total = mine
        entries: Entries | None = None
        folds = self.folds = _own_safe_folds(delta.folds, replica_id) if delta.folds else None
        if folds:
            total += sum(fold[1] for fold in folds.values())
        for rid in used.keys() | anchors.keys() | delta.marks.keys():
            if rid == replica_id or (folds and self.folded(rid)):
                continue
            value = used.get(rid, 0)
            anchor = anchors.get(rid)
            got = delta.marks.get(rid)
            entry: Entries = [
                rid,
                value,
                None if anchor is None else anchor[0],
                0 if anchor is None else anchor[1],
                _join_marks(None, got, self.epoch, slice_len),
                0 if anchor is None else anchor[2],
            ]
            # (a concatenation is allocated to size; extend() would over-allocate)
            entries = entry if entries is None else entries + entry
            total += value
        self._entries = None if entries is None else untrack(entries)
        self.total = total
        if delta.rule:
            self.rule = delta.rule
        self._derive_edge()
        self._recompute()
        self._pack()  # one other replica's entry and none of ours: held in place

    @classmethod
    def from_delta(cls, delta: BucketDelta, replica_id: str) -> Bucket:
        bucket = cls(_BLANK, 0, delta.rule)  # every field is set again by _replace
        bucket._replace(delta, replica_id)
        return bucket


_BLANK: Final = BucketConfig(1, 1, 1, SHARED, (0, ""))
"""A placeholder config for ``from_delta``'s constructor call (a compiled class has
no bare ``__new__``)."""


def incarnation_of(rid: str) -> tuple[str, int | None]:
    """``region/node/N`` as (``region/node``, N); N is None when the last part is not
    a decimal number (such an id is never folded)."""
    node, _, last = rid.rpartition("/")
    if last.isascii() and last.isdigit():
        return node, int(last)
    return rid, None


def below_watermark(rid: str, node: str, watermark: int) -> bool:
    found, number = incarnation_of(rid)
    return found == node and number is not None and number < watermark


def _own_safe_folds(
    folds: dict[str, tuple[int, int]], replica_id: str
) -> dict[str, tuple[int, int]] | None:
    """``folds`` without a record that would cover ``replica_id`` itself (a copy)."""
    node, number = incarnation_of(replica_id)
    out = {
        name: (fold[0], fold[1])
        for name, fold in folds.items()
        if name != node or number is None or number >= fold[0]
    }
    return out or None


def plan_folds(
    views: Sequence[BucketDelta | None],
    live: Iterable[str] = (),
    *,
    require_final: bool = True,
) -> dict[str, tuple[int, int]]:
    """The fold records every region may take for one bucket, given every region's
    view of it (None: a region without the bucket) and the replica ids known to be
    running: node -> (W, F), only for nodes whose watermark moves.

    An incarnation ``region/node/k`` is folded only when

    * it is retired: a newer incarnation of the same node (``region/node/M``, M > k)
      is running (in ``live``) or appears in some view; and
    * it is final everywhere: every region holds the bucket, in the same epoch, and
      holds exactly the same entry for it (count, anchor and marks).

    The caller provides the third condition, which no single state can show: no
    process of the mesh stopped within the last sync window (±30 s: a message
    sealed earlier is refused on arrival). Then every message that can still be
    accepted was sealed by a running process and carries at most what that
    process holds now, so the value every region holds is the last one any
    message can carry, and a late or duplicated message changes nothing.
    ``bucketmesh reconcile`` shows it by seeing the same replica answer for every
    region at the start of its run and again a sync window later.

    The watermark moves over a contiguous run of such incarnations from the lowest
    one up, and F is the joined record's F plus their counts. ``require_final`` False
    skips the second condition (the simulator's mutant, which it must catch)."""
    if require_final and (not views or any(view is None for view in views)):
        return {}
    present = [view for view in views if view is not None]
    if not present:
        return {}
    epoch = max(view.epoch for view in present)
    if require_final and any(view.epoch != epoch for view in present):
        return {}
    present = [view for view in present if view.epoch == epoch]
    # node -> its newest incarnation known: every older one is retired
    proven: dict[str, int] = {}
    for rid in live:
        node, number = incarnation_of(rid)
        if number is not None and number > proven.get(node, -1):
            proven[node] = number
    joined: dict[str, tuple[int, int]] = {}
    ids: dict[str, dict[int, str]] = {}
    for view in present:
        for node, fold in view.folds.items():
            if node not in joined or (fold[0], fold[1]) > joined[node]:
                joined[node] = (fold[0], fold[1])
        for rid in view.used.keys() | view.anchor_at.keys() | view.marks.keys():
            node, number = incarnation_of(rid)
            if number is None:
                continue
            ids.setdefault(node, {})[number] = rid
            if number > proven.get(node, -1):
                proven[node] = number
    plan: dict[str, tuple[int, int]] = {}
    for node, incarnations in ids.items():
        watermark, tokens = joined.get(node, (0, 0))
        moved = watermark
        for number in sorted(incarnations):
            if number < watermark:
                continue
            if number >= proven[node]:
                break  # the newest known: running, or about to be
            rid = incarnations[number]
            held = [_entry_of(view, rid) for view in present]
            if require_final and any(entry != held[0] for entry in held):
                break
            tokens += held[0][0]  # the same everywhere (or, unchecked, the first view's)
            moved = number + 1
        if moved > watermark:
            plan[node] = (moved, tokens)
    return plan


def _entry_of(view: BucketDelta, rid: str) -> tuple[int, int | None, int, int, tuple[int, ...]]:
    """``rid``'s whole entry in ``view`` (count, anchor, marks); zero when absent."""
    at = view.anchor_at.get(rid)
    return (
        view.used.get(rid, 0),
        at,
        view.anchor_used.get(rid, 0) if at is not None else 0,
        view.anchor_begun.get(rid, 0) if at is not None else 0,
        tuple(view.marks.get(rid, ())),
    )


def delta_tat(delta: BucketDelta) -> int:
    """The TAT a replica holding exactly ``delta`` computes (digests, expiry checks).

    The usual shapes — no records, or one replica's — are evaluated directly (the
    sweep of ``Bucket._recompute`` reduces to them); anything else goes through a
    Bucket."""
    interval = delta.config.interval_ns
    total = sum(delta.used.values())
    if delta.folds:
        return Bucket.from_delta(delta, "").tat()
    tat = delta.base_time + (total - delta.base_used) * interval
    holders = delta.anchor_at.keys() | delta.marks.keys()
    if not holders:
        return tat
    if len(holders) > 1:
        return Bucket.from_delta(delta, "").tat()
    (rid,) = holders
    epoch = delta.epoch
    floor = delta.base_time if delta.base_time == epoch else delta.base_time + 1
    records = _records(
        epoch,
        slice_ns(delta.config),
        delta.anchor_at.get(rid),
        delta.anchor_used.get(rid, 0),
        delta.anchor_begun.get(rid, 0),
        delta.marks.get(rid),
        floor,
    )
    used = delta.used.get(rid, 0)
    for point, before in records.items():
        term = point + (used - before) * interval
        if term > tat:
            tat = term
    return tat


def _write_grants(count: int, allowed: list[bool], retry_after: list[float]) -> None:
    """``Bucket.acquire_into``'s grants: ``count`` rows allowed, with no retry_after."""
    if count == 1:  # (a list of one to extend with costs more than the append)
        allowed.append(True)
        retry_after.append(0.0)
    else:
        allowed.extend([True] * count)
        retry_after.extend([0.0] * count)

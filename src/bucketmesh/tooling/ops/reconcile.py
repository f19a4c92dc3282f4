"""``bucketmesh reconcile``: compare every region's full state key by key, and make
every region hold the join of all of them.

The regions are read through the sync protocol (``syncclient.py``): the tool
holds the mesh's secret and pulls the full state of a few key ranges at a time
from every region at once, compares that page, pushes the repairs for it and
moves on, so its memory is one page per region whatever the bucket count. A
page is sized to about ``--page-keys`` buckets (the first one, 4 of the 256
ranges, measures how many keys a range holds): a region builds one page's
reply in one go, so the page bounds how long it stops deciding for it.

Comparison uses the core's own merge, never the fields of a state: each
region's view of a key is ``Bucket.from_delta``, the join merges all of them,
and a region differs when its view's full state does not encode as the join's
(``protocol.canonical``, the encoding the digests hash). Its divergence in
tokens is what it would grant beyond the join now: ``level(view) − level(join)``
(a region without the key would start it full). The replicas whose entries
differ are read from the full states' ``used`` maps.

Repair pushes, to each region that differs, the join's full state of the keys
it differs on, as a full-state ``deltas`` message: the region merges it like
any peer's transfer. Merging is a join, so a repair can only add what another
region already holds: it never grants tokens back, and running it twice, or
while the mesh repairs itself, is harmless. Keys under live traffic may show a
difference that is only a delta in flight; the repair of those is harmless too.

Retired incarnations (an older ``region/node/N`` of a node that now runs a newer
one) are folded away unless ``--no-fold``: a key where every region holds the
same final entry for one is pulled again ``--fold-wait`` seconds (35: the sync
window plus skew) after the first look, if every region is still answered by the
same replica, and the join is pushed with the fold records (docs/operations.md).
``--dry-run`` only counts them. Folding does not change the exit status.

Exit status: 0 every region holds the same state; 1 differences found (and,
unless ``--dry-run``, repaired); 2 a usage error, or a region unreachable or
refusing (wrong cluster id, a secret that does not verify).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import os
import re
import signal
import sys
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TextIO

from bucketmesh.core.bucket import Bucket, BucketConfig, BucketDelta, below_watermark, plan_folds
from bucketmesh.core.limiter import DeltaBatch
from bucketmesh.replication import protocol as sync
from bucketmesh.telemetry.audit import AuditLog, why_unwritable
from bucketmesh.telemetry.log import logger
from bucketmesh.tooling.ops.syncclient import RegionClient, RegionError, tool_replica_id

log = logger("reconcile")

#: The replica id the tool's views hold as their own: no region's (see syncclient).
VIEW_ID: Final = "@reconcile/view/0"
DEFAULT_PAGE_KEYS: Final = 20000
FIRST_GROUP: Final = 4
MAX_GROUP: Final = 64
DEFAULT_TIMEOUT_S: Final = 30.0
#: How long folding waits between its two looks at the regions: the mesh's sync window
#: (a message sealed more than 30 s ago is refused) plus 5 s of clock skew.
DEFAULT_FOLD_WAIT_S: Final = 35.0
#: Retired incarnations named in the report (the counts are always whole).
LISTED_INCARNATIONS: Final = 100
DEFAULT_MAX_MESSAGE: Final = 65536
TOP_KEYS: Final = 20
PULL_RETRIES: Final = 3
_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: Characters that print as a hyphen (the articles' "global‑rate‑limit‑cluster" has U+2011).
_HYPHENS: Final = "\u2010\u2011\u2012\u2013\u2212\ufe63\uff0d"

OK: Final = 0
DIFFERENCES: Final = 1
FAILED: Final = 2


# -- where the regions are ----------------------------------------------------


class _SyncSection(Protocol):
    @property
    def enabled(self) -> bool: ...
    @property
    def sync_cluster_id(self) -> str: ...
    @property
    def secret(self) -> str | tuple[str, ...] | None: ...
    @property
    def peer_urls(self) -> dict[str, str]: ...
    def url_for(self, region: str) -> str | None: ...


class _Limits(Protocol):
    @property
    def max_body_bytes(self) -> int: ...


class NodeConfig(Protocol):
    """What reconcile reads from a node's config (``node.config.Config`` is one)."""

    @property
    def region(self) -> str: ...
    @property
    def regions(self) -> tuple[str, ...]: ...
    @property
    def listen_host(self) -> str: ...
    @property
    def listen_port(self) -> int: ...
    @property
    def path(self) -> str | None: ...
    @property
    def sync(self) -> _SyncSection: ...
    @property
    def limits(self) -> _Limits: ...


ConfigLoader = Callable[[str], NodeConfig]


class UsageError(Exception):
    """Bad arguments or settings: exit status 2 before anything is sent."""


@dataclass
class Targets:
    """The regions to reconcile and how to speak to them."""

    urls: dict[str, str]
    cluster_id: str
    secret: str | tuple[str, ...] | None
    max_message: int = DEFAULT_MAX_MESSAGE


def ascii_hyphens(text: str) -> str:
    """``text`` with every character that prints as a hyphen made ``-``."""
    return "".join("-" if c in _HYPHENS else c for c in unicodedata.normalize("NFKC", text))


def parse_urls(text: str, source: str) -> dict[str, str]:
    """``REGION=URL[,REGION=URL...]`` (what ``--url`` and ``BUCKETMESH_RECONCILE_URLS`` take)."""
    urls: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        region, sep, url = item.partition("=")
        region, url = region.strip(), url.strip().rstrip("/")
        if not sep or _REGION.fullmatch(region) is None:
            raise UsageError(f"{source}: expected REGION=http(s)://host:port, got {item!r}")
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise UsageError(f"{source}: {region}'s URL must be http(s)://host[:port], got {url!r}")
        if region in urls:
            raise UsageError(f"{source}: region {region!r} is given twice")
        urls[region] = url
    return urls


def _secrets(text: str) -> tuple[str, ...]:
    """A secret file's secrets, one per line (during a rotation: the new one first)."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _own_url(config: NodeConfig) -> str:
    explicit = config.sync.peer_urls.get(config.region)
    if explicit:
        return explicit.rstrip("/")
    host = config.listen_host
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.listen_port}"


def resolve(
    args: argparse.Namespace, environ: Mapping[str, str], load_config: ConfigLoader | None
) -> Targets:
    """The regions, cluster id and secret from flags, then the environment, then the
    node's config file (``--config`` or ``BUCKETMESH_CONFIG``)."""
    urls: dict[str, str] = {}
    cluster: str | None = None
    secret: str | tuple[str, ...] | None = None
    max_message = DEFAULT_MAX_MESSAGE
    config_path = args.config or environ.get("BUCKETMESH_CONFIG") or None
    if config_path:
        if load_config is None:
            raise UsageError("--config: no config loader in this build")
        try:
            config = load_config(config_path)
        except (ValueError, OSError) as error:
            raise UsageError(str(error)) from None
        if not config.sync.enabled:
            raise UsageError(f"{config_path}: sync.enabled is false: there is no mesh to reconcile")
        for region in config.regions:
            url = _own_url(config) if region == config.region else config.sync.url_for(region)
            if url:
                urls[region] = url.rstrip("/")
        cluster = config.sync.sync_cluster_id
        secret = config.sync.secret
        max_message = config.limits.max_body_bytes
    if environ.get("BUCKETMESH_RECONCILE_URLS"):
        urls.update(parse_urls(environ["BUCKETMESH_RECONCILE_URLS"], "BUCKETMESH_RECONCILE_URLS"))
    for text in args.url or ():
        urls.update(parse_urls(text, "--url"))
    if args.secret_file:
        try:
            with open(args.secret_file, encoding="utf-8") as stream:
                secret = _secrets(stream.read())
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--secret-file: cannot read {args.secret_file}: {error}") from None
    elif not config_path:
        if environ.get("BUCKETMESH_SYNC_SECRET"):
            secret = environ["BUCKETMESH_SYNC_SECRET"]
        elif environ.get("BUCKETMESH_SYNC_SECRET_FILE"):
            try:
                with open(environ["BUCKETMESH_SYNC_SECRET_FILE"], encoding="utf-8") as stream:
                    secret = _secrets(stream.read())
            except (OSError, UnicodeDecodeError) as error:
                raise UsageError(f"BUCKETMESH_SYNC_SECRET_FILE: {error}") from None
    if args.cluster is not None:
        if cluster is not None and ascii_hyphens(args.cluster) != ascii_hyphens(cluster):
            raise UsageError(
                f"--cluster {args.cluster!r} is not this mesh: {config_path} says "
                f"sync.syncClusterId {cluster!r}"
            )
        cluster = args.cluster
    elif cluster is None:
        cluster = environ.get("BUCKETMESH_SYNC_CLUSTER_ID") or None
    if not cluster:
        raise UsageError("--cluster is required (or a node config that names syncClusterId)")
    if not urls:
        raise UsageError(
            "no region to reconcile: give --url REGION=URL (repeatable), "
            "BUCKETMESH_RECONCILE_URLS=REGION=URL,... or a node config "
            "(--config, BUCKETMESH_CONFIG)"
        )
    if not secret and not args.insecure_sync:
        raise UsageError(
            "no sync secret: the mesh signs every message; give --secret-file, "
            "BUCKETMESH_SYNC_SECRET (or _FILE), a node config holding it, or --insecure-sync "
            "for a mesh running without one"
        )
    return Targets(dict(sorted(urls.items())), cluster, secret or None, max_message)


# -- comparing one key ------------------------------------------------------------


def joined_state(bucket: Bucket, key: str) -> BucketDelta:
    """``bucket``'s full state without the view's own (empty) entry."""
    state = bucket.full_state(key, VIEW_ID)
    state.used.pop(VIEW_ID, None)
    return state


@dataclass
class KeyDivergence:
    """One key some region holds differently from the join."""

    key: str
    #: region → tokens it would grant beyond the join now (0: same level, other state)
    regions: dict[str, int]
    #: replica ids whose entries of ``used`` differ between the views and the join
    replicas: list[str]
    #: the join's level now: what every region holds once repaired
    level: int = 0

    @property
    def tokens(self) -> int:
        return max(self.regions.values())


def compare_key(
    key: str, views: Mapping[str, BucketDelta | None], now_ns: int
) -> tuple[BucketDelta, KeyDivergence | None]:
    """The join of every region's view of ``key`` (None: the region has no live bucket)
    and how the views differ from it (None when none does)."""
    present = [view for view in views.values() if view is not None]
    join = Bucket.from_delta(present[0], VIEW_ID)
    for view in present[1:]:
        join.merge(view, VIEW_ID)
    joined = joined_state(join, key)
    target = sync.canonical(joined)
    level = join.level(now_ns)
    behind: dict[str, int] = {}
    replicas: set[str] = set()
    for region, delta in views.items():
        if delta is None:
            behind[region] = join.config.capacity - level
            replicas.update(rid for rid, n in joined.used.items() if n > 0)
            continue
        bucket = Bucket.from_delta(delta, VIEW_ID)
        state = joined_state(bucket, key)
        if sync.canonical(state) == target:
            continue
        behind[region] = max(0, bucket.level(now_ns) - level)
        replicas.update(
            rid
            for rid in joined.used.keys() | state.used.keys()
            if joined.used.get(rid, 0) != state.used.get(rid, 0)
        )
    if not behind:
        return joined, None
    return joined, KeyDivergence(key, behind, sorted(replicas), level)


def join_rules(batches: Mapping[str, DeltaBatch]) -> dict[str, BucketConfig]:
    """Every rule-level config, the newest version of each."""
    rules: dict[str, BucketConfig] = {}
    for batch in batches.values():
        for name, config in batch.rules.items():
            if name not in rules or config.version > rules[name].version:
                rules[name] = config
    return rules


# -- the run ---------------------------------------------------------------------


@dataclass
class RegionReport:
    region: str
    url: str
    replica_id: str | None = None
    cluster_id: str | None = None
    keys: int = 0
    keys_behind: int = 0
    max_tokens_behind: int = 0
    rules_behind: int = 0
    buckets_changed: int = 0
    requests: int = 0
    bytes_pulled: int = 0
    error: str | None = None
    error_kind: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None


@dataclass
class Report:
    cluster_id: str
    repair: bool
    regions: dict[str, RegionReport]
    keys_compared: int = 0
    keys_differing: int = 0
    rules_differing: int = 0
    ranges_done: int = 0
    elapsed_s: float = 0.0
    top: list[tuple[int, str, KeyDivergence]] = field(default_factory=list)
    #: folding retired incarnations: "folded", "dry-run", "skipped", "off" or "none"
    fold_mode: str = "none"
    #: entries of retired incarnations that were final everywhere in the first look
    foldable_entries: int = 0
    #: the key ranges holding them (what the second look pulls again)
    fold_ranges: set[int] = field(default_factory=set)
    folded_keys: int = 0
    folded_entries: int = 0
    folded_incarnations: set[str] = field(default_factory=set)
    fold_skipped: str | None = None

    @property
    def unreachable(self) -> list[str]:
        return [r for r, rep in self.regions.items() if not rep.reachable]

    @property
    def largest(self) -> KeyDivergence | None:
        return max(self.top, key=lambda item: (item[0], item[1]))[2] if self.top else None

    def note(self, divergence: KeyDivergence) -> None:
        item = (divergence.tokens, divergence.key, divergence)
        if len(self.top) < TOP_KEYS:
            heapq.heappush(self.top, item)
        elif item[:2] > self.top[0][:2]:
            heapq.heapreplace(self.top, item)

    @property
    def status(self) -> int:
        if self.unreachable or not self.regions:
            return FAILED
        return DIFFERENCES if self.keys_differing or self.rules_differing else OK

    def to_json(self) -> dict[str, Any]:
        largest = self.largest
        ranked = sorted(self.top, key=lambda item: (-item[0], item[1]))
        return {
            "cluster": self.cluster_id,
            "mode": "repair" if self.repair else "dry-run",
            "status": self.status,
            "keys_compared": self.keys_compared,
            "keys_differing": self.keys_differing,
            "rules_differing": self.rules_differing,
            "largest_divergence": None
            if largest is None
            else {
                "key": largest.key,
                "tokens": largest.tokens,
                "region": max(largest.regions, key=lambda r: (largest.regions[r], r)),
                "regions": largest.regions,
                "replicas": largest.replicas,
            },
            "divergent_keys": [
                {"key": d.key, "tokens": d.tokens, "regions": d.regions, "replicas": d.replicas}
                for _, _, d in ranked
            ],
            "unreachable": self.unreachable,
            "regions": {
                name: {
                    "url": rep.url,
                    "replica": rep.replica_id,
                    "reachable": rep.reachable,
                    "keys": rep.keys,
                    "keys_behind": rep.keys_behind,
                    "max_tokens_behind": rep.max_tokens_behind,
                    "rules_behind": rep.rules_behind,
                    "buckets_changed": rep.buckets_changed,
                    "requests": rep.requests,
                    "bytes_pulled": rep.bytes_pulled,
                    "error": rep.error,
                }
                for name, rep in self.regions.items()
            },
            "ranges": {"done": self.ranges_done, "total": sync.RANGES},
            "elapsed_s": round(self.elapsed_s, 3),
            "folds": {
                "mode": self.fold_mode,
                "foldable_entries": self.foldable_entries,
                "keys": self.folded_keys,
                "entries": self.folded_entries,
                "incarnations": sorted(self.folded_incarnations)[:LISTED_INCARNATIONS],
                "skipped": self.fold_skipped,
            },
        }


class Reconciler:
    """One reconcile run over ``targets`` (see the module docstring)."""

    def __init__(
        self,
        targets: Targets,
        *,
        repair: bool,
        page_keys: int = DEFAULT_PAGE_KEYS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        progress: Callable[[int, int], None] | None = None,
        audit: AuditLog | None = None,
        clock: Callable[[], int] = time.time_ns,
        fold: bool = True,
        fold_wait_s: float = DEFAULT_FOLD_WAIT_S,
    ) -> None:
        self.targets = targets
        self.fold = fold
        self.fold_wait_s = fold_wait_s
        self.repair = repair
        self.page_keys = page_keys
        self.timeout_s = timeout_s
        self.progress = progress
        self.audit = audit
        self.clock = clock
        self.sender = tool_replica_id()
        self.report = Report(
            targets.cluster_id,
            repair,
            {region: RegionReport(region, url) for region, url in targets.urls.items()},
        )
        self.clients: dict[str, RegionClient] = {}

    def _client(self, region: str, cluster_id: str) -> RegionClient:
        auth = sync.SyncAuth(cluster_id, self.targets.secret)
        return RegionClient(
            region, self.targets.urls[region], auth, self.sender, timeout_s=self.timeout_s
        )

    async def _connect(self, region: str) -> None:
        """Say hello with the cluster id as given, then (only if the region names
        another cluster) with its hyphens made ASCII; record who answered."""
        spellings = list(
            dict.fromkeys((self.targets.cluster_id, ascii_hyphens(self.targets.cluster_id)))
        )
        rep = self.report.regions[region]
        for index, cluster_id in enumerate(spellings):
            client = self._client(region, cluster_id)
            try:
                replica_id = await client.hello()
            except RegionError as error:
                client.close()
                if error.kind == "wrong_cluster" and index + 1 < len(spellings):
                    continue
                self._fail(region, error)
                return
            # a node of the region: ``region/...``, or one of its pods on the memory
            # store, whose replicas are named ``region.<pod>/...`` (docs/scale.md)
            if not replica_id.startswith((f"{region}/", f"{region}.")):
                client.close()
                self._fail(
                    region,
                    RegionError(
                        "refused",
                        f"{rep.url} answered as replica {replica_id}, not a node of {region}",
                    ),
                )
                return
            rep.replica_id = replica_id
            rep.cluster_id = cluster_id
            self.clients[region] = client
            return

    def _fail(self, region: str, error: RegionError) -> None:
        rep = self.report.regions[region]
        rep.error, rep.error_kind = error.message, error.kind
        client = self.clients.pop(region, None)
        if client is not None:
            client.close()

    async def _pull(self, region: str, ranges: Sequence[int]) -> DeltaBatch | None:
        client = self.clients[region]
        for attempt in range(PULL_RETRIES):
            try:
                return await client.pull(ranges)
            except RegionError as error:
                if error.kind != "unreachable" or attempt + 1 == PULL_RETRIES:
                    self._fail(region, error)
                    return None
                await asyncio.sleep(0.2 * 2**attempt)
        return None

    async def _push(
        self,
        region: str,
        repairs: list[tuple[BucketDelta, KeyDivergence]],
        rules: dict[str, BucketConfig],
    ) -> None:
        client = self.clients.get(region)
        if client is None:
            return
        try:
            changed = await client.push(
                [joined for joined, _ in repairs], rules, self.targets.max_message
            )
        except RegionError as error:
            self._fail(region, error)
            return
        self.report.regions[region].buckets_changed += changed
        if self.audit is not None:
            for joined, divergence in repairs:
                tokens = divergence.regions[region]
                self.audit.change(
                    "reconcile-repair",
                    who=self.sender,
                    old={"tokens_remaining": divergence.level + tokens},
                    new={"tokens_remaining": divergence.level},
                    region=region,
                    key=joined.key,
                    replicas=divergence.replicas,
                )
            for name, config in rules.items():
                self.audit.change(
                    "reconcile-repair",
                    who=self.sender,
                    old=None,
                    new={"capacity": config.capacity, "refill_rate": config.refill_rate},
                    region=region,
                    rule=name,
                )

    async def run(self) -> Report:
        started = time.monotonic()
        try:
            await asyncio.gather(*(self._connect(region) for region in self.targets.urls))
            first_look = time.monotonic()
            start = 0
            group = FIRST_GROUP
            while start < sync.RANGES and self.clients:
                ranges = list(range(start, min(sync.RANGES, start + group)))
                per_range = await self._page(ranges)
                start += len(ranges)
                self.report.ranges_done = start
                if self.progress is not None:
                    self.progress(start, sync.RANGES)
                group = max(1, min(MAX_GROUP, self.page_keys // max(1, math.ceil(per_range))))
            await self._fold_retired(first_look)
        finally:
            for client in self.clients.values():
                self.report.regions[client.region].requests = client.requests
                self.report.regions[client.region].bytes_pulled = client.bytes_received
                client.close()
            self.report.elapsed_s = time.monotonic() - started
        return self.report

    async def _page(self, ranges: list[int]) -> float:
        """Pull, compare and repair ``ranges``; returns the keys a range held (the most
        any region had), to size the next page."""
        regions = list(self.clients)
        pulled = await asyncio.gather(*(self._pull(region, ranges) for region in regions))
        batches = {r: b for r, b in zip(regions, pulled, strict=True) if b is not None}
        if not batches:
            return 0.0
        views: dict[str, dict[str, BucketDelta]] = {}
        for region, batch in batches.items():
            self.report.regions[region].keys += len(batch.deltas)
            for delta in batch.deltas:
                views.setdefault(delta.key, {})[region] = delta
        now = self.clock()
        repairs: dict[str, list[tuple[BucketDelta, KeyDivergence]]] = {r: [] for r in batches}
        for key, held in views.items():
            joined, divergence = compare_key(key, {r: held.get(r) for r in batches}, now)
            self.report.keys_compared += 1
            if divergence is None:
                continue
            self.report.keys_differing += 1
            self.report.note(divergence)
            for region, tokens in divergence.regions.items():
                rep = self.report.regions[region]
                rep.keys_behind += 1
                rep.max_tokens_behind = max(rep.max_tokens_behind, tokens)
                repairs[region].append((joined, divergence))
        if self.fold and len(batches) == len(self.targets.urls):
            live = self._live()
            for key, held in views.items():
                found = [held.get(r) for r in batches]
                plan = plan_folds(found, live)
                if plan:
                    self.report.foldable_entries += len(folded_ids(found, plan))
                    self.report.fold_ranges.add(sync.range_of(key))
        rules = join_rules(batches)
        rule_repairs: dict[str, dict[str, BucketConfig]] = {}
        for region, batch in batches.items():
            stale = {
                name: config
                for name, config in rules.items()
                if name in batch.rules and batch.rules[name].version < config.version
            }
            if stale and ranges[0] == 0:  # rules travel with every page: count them once
                self.report.regions[region].rules_behind = len(stale)
                self.report.rules_differing = max(self.report.rules_differing, len(stale))
            if stale:
                rule_repairs[region] = stale
        if self.repair:
            await asyncio.gather(
                *(
                    self._push(region, repairs[region], rule_repairs.get(region, {}))
                    for region in batches
                    if repairs[region] or rule_repairs.get(region)
                )
            )
        return max(len(b.deltas) for b in batches.values()) / len(ranges)

    def _live(self) -> list[str]:
        """The replica that answered for each region: running incarnations."""
        return [rep.replica_id for rep in self.report.regions.values() if rep.replica_id]

    async def _fold_retired(self, first_look: float) -> None:
        """Fold the entries of retired incarnations away (docs/design.md section 3,
        "Retired incarnations").

        The first look (the pass above) found keys where an incarnation is retired
        (its node answers under a newer one) and every region holds its same final
        entry. No single look shows the last condition: that no process of the mesh
        stopped within the sync window, so no message a stopped process sealed (and
        no running one can account for) can still be accepted. Hence a second look a
        window later (``--fold-wait``): if every region is answered by the same
        replica as at the first look, nobody restarted in between, every message
        still acceptable comes from a running process, and the keys' ranges are
        pulled again, planned again and the folds pushed, as full states carrying
        them, to every region."""
        report = self.report
        if not self.fold:
            report.fold_mode = "off"
            return
        if not report.foldable_entries:
            return
        # a Redis-backed region folds too: its merge script joins the fold records
        # (storage/lua/common.lua, fold_in) as Bucket.fold does
        if not self.repair:
            report.fold_mode = "dry-run"
            return
        if report.unreachable or len(self.clients) != len(self.targets.urls):
            report.fold_mode = "skipped"
            report.fold_skipped = "a region was unreachable"
            return
        first = {region: rep.replica_id for region, rep in report.regions.items()}
        wait = self.fold_wait_s - (time.monotonic() - first_look)
        if wait > 0:
            log.info("reconcile: folding retired incarnations in %.1fs (--fold-wait)", wait)
            await asyncio.sleep(wait)
        for region, client in list(self.clients.items()):
            try:
                answered = await client.hello()
            except RegionError as error:
                self._fail(region, error)
                report.fold_mode = "skipped"
                report.fold_skipped = f"{region} did not answer the second look"
                return
            if answered != first[region]:
                report.fold_mode = "skipped"
                report.fold_skipped = (
                    f"{region} restarted during the run ({first[region]} -> {answered}): "
                    "run reconcile again"
                )
                return
        report.fold_mode = "folded"
        live = self._live()
        ranges = sorted(report.fold_ranges)
        regions = list(self.clients)
        for start in range(0, len(ranges), MAX_GROUP):
            chunk = ranges[start : start + MAX_GROUP]
            pulled = await asyncio.gather(*(self._pull(region, chunk) for region in regions))
            batches = {r: b for r, b in zip(regions, pulled, strict=True) if b is not None}
            if len(batches) != len(regions):
                report.fold_mode = "skipped"
                report.fold_skipped = "a region stopped answering during the second look"
                return
            views: dict[str, dict[str, BucketDelta]] = {}
            for region, batch in batches.items():
                for delta in batch.deltas:
                    views.setdefault(delta.key, {})[region] = delta
            pushes: list[BucketDelta] = []
            for key, held in views.items():
                found = [held.get(r) for r in regions]
                plan = plan_folds(found, live)
                if not plan:
                    continue
                state, folded = fold_state(key, found, plan)
                pushes.append(state)
                report.folded_keys += 1
                report.folded_entries += len(folded)
                report.folded_incarnations.update(folded)
                if self.audit is not None:
                    self.audit.change(
                        "reconcile-fold",
                        who=self.sender,
                        old={"replicas": folded},
                        new={"folds": {node: list(fold) for node, fold in plan.items()}},
                        key=key,
                    )
            if pushes:
                await asyncio.gather(*(self._push_folds(region, pushes) for region in regions))

    async def _push_folds(self, region: str, pushes: list[BucketDelta]) -> None:
        client = self.clients.get(region)
        if client is None:
            return
        try:
            changed = await client.push(pushes, {}, self.targets.max_message)
        except RegionError as error:
            self._fail(region, error)
            return
        self.report.regions[region].buckets_changed += changed


def folded_ids(
    views: Sequence[BucketDelta | None], plan: Mapping[str, tuple[int, int]]
) -> list[str]:
    """The replica ids whose entries ``plan`` folds away in ``views`` (sorted)."""
    ids: set[str] = set()
    for view in views:
        if view is None:
            continue
        for rid in view.used.keys() | view.anchor_at.keys() | view.marks.keys():
            for node, (watermark, _) in plan.items():
                if below_watermark(rid, node, watermark):
                    ids.add(rid)
    return sorted(ids)


def fold_state(
    key: str, views: Sequence[BucketDelta | None], plan: Mapping[str, tuple[int, int]]
) -> tuple[BucketDelta, list[str]]:
    """The join of ``views`` with ``plan``'s folds applied (what every region is sent),
    and the replica ids folded away."""
    present = [view for view in views if view is not None]
    join = Bucket.from_delta(present[0], VIEW_ID)
    for view in present[1:]:
        join.merge(view, VIEW_ID)
    join.fold(dict(plan), VIEW_ID)
    return joined_state(join, key), folded_ids(views, plan)


# -- output ------------------------------------------------------------------------


def render_table(report: Report, out: TextIO) -> None:
    data = report.to_json()
    mode = "repaired" if report.repair else "dry run, nothing changed"
    out.write(f"reconcile {report.cluster_id!r}: {len(report.regions)} regions ({mode})\n\n")
    rows = [("region", "replica", "keys", "behind", "max tokens", "changed", "status")]
    for name, rep in report.regions.items():
        rows.append(
            (
                name,
                rep.replica_id or "-",
                str(rep.keys),
                str(rep.keys_behind),
                str(rep.max_tokens_behind),
                str(rep.buckets_changed) if report.repair else "-",
                "ok" if rep.reachable else f"UNREACHABLE ({rep.error_kind})",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")
    out.write(
        f"\nkeys compared {data['keys_compared']}, differing {data['keys_differing']}, "
        f"rules differing {data['rules_differing']}, "
        f"ranges {data['ranges']['done']}/{data['ranges']['total']}, "
        f"{data['elapsed_s']:.2f}s\n"
    )
    largest = data["largest_divergence"]
    if largest is not None:
        out.write(
            f"largest divergence: {largest['tokens']} tokens on {largest['key']!r} in "
            f"{largest['region']}; replicas whose entries differ: "
            f"{', '.join(largest['replicas']) or '(none: base or config)'}\n"
        )
    for item in data["divergent_keys"][1:]:
        out.write(f"  {item['key']!r}: {item['tokens']} tokens ({', '.join(item['regions'])})\n")
    folds = data["folds"]
    if report.fold_mode == "folded":
        out.write(
            f"retired incarnations: folded {folds['entries']} entries in {folds['keys']} keys "
            f"({', '.join(folds['incarnations']) or '-'})\n"
        )
    elif report.fold_mode == "dry-run":
        out.write(
            f"retired incarnations: {folds['foldable_entries']} entries foldable "
            "(dry run, nothing folded)\n"
        )
    elif report.fold_mode == "skipped":
        out.write(f"retired incarnations: not folded: {folds['skipped']}\n")
    for name in report.unreachable:
        out.write(f"error: {name}: {report.regions[name].error}\n")


def _progress_printer(
    enabled: bool,
) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A rich progress bar on a terminal, nothing elsewhere (a pod's log stays quiet)."""
    if not enabled:
        return None, lambda: None
    try:
        from rich.console import Console
        from rich.progress import Progress  # optional: a dev dependency
    except ImportError:
        return None, lambda: None
    bar = Progress(console=Console(stderr=True), transient=True)  # stdout is the report
    task = bar.add_task("reconciling key ranges", total=sync.RANGES)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= 10_000_000:
        raise argparse.ArgumentTypeError(f"must be 1 … 10000000, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 3600 seconds, got {text}")
    return value


def _fold_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be 0 … 3600 seconds, got {text}")
    return value


def add_parser(sub: Any, load_config: ConfigLoader | None) -> None:
    p = sub.add_parser(
        "reconcile",
        help="compare every region's state key by key; repair to the join",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cluster", help="the mesh's syncClusterId (hyphen look-alikes such as U+2011 match '-')"
    )
    p.add_argument(
        "--url",
        action="append",
        metavar="REGION=URL",
        help="a region's URL (repeatable, or comma-separated); beats BUCKETMESH_RECONCILE_URLS "
        "and the config",
    )
    p.add_argument(
        "--config",
        "-c",
        help="a node's bucketmesh.yaml (default $BUCKETMESH_CONFIG): regions, "
        "URLs, cluster id and secret",
    )
    p.add_argument("--secret-file", help="a file holding the sync secret")
    p.add_argument(
        "--insecure-sync", action="store_true", help="the mesh runs without a secret (unsigned)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--repair",
        dest="repair",
        action="store_true",
        default=True,
        help="push the join to every region that differs (the default)",
    )
    mode.add_argument(
        "--dry-run", dest="repair", action="store_false", help="compare and report only"
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument(
        "--page-keys",
        type=_positive_int,
        default=DEFAULT_PAGE_KEYS,
        help=f"about this many buckets per pull request (default {DEFAULT_PAGE_KEYS})",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds one request may take (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--no-fold",
        dest="fold",
        action="store_false",
        help="do not fold the entries of retired incarnations away (folding is the default "
        "with --repair; --dry-run reports how many could be folded)",
    )
    p.add_argument(
        "--fold-wait",
        type=_fold_seconds,
        default=DEFAULT_FOLD_WAIT_S,
        metavar="SECONDS",
        help="seconds between the first look and the second one that folds (default "
        f"{DEFAULT_FOLD_WAIT_S:g}: the mesh's 30 s sync window plus clock skew; lower is "
        "safe only where no sync message can be in flight that long)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument(
        "--audit",
        metavar="FILE",
        help="append each repair to this audit trail (JSON lines; - for stdout): "
        "who, region, key, tokens_remaining old -> new",
    )
    p.set_defaults(func=lambda args: cmd_reconcile(args, load_config), usage_error=p.error)


def cmd_reconcile(
    args: argparse.Namespace,
    load_config: ConfigLoader | None,
    *,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    try:
        targets = resolve(args, os.environ if environ is None else environ, load_config)
    except UsageError as error:
        log.error("reconcile: error: %s", error)
        return FAILED
    if args.audit and args.audit != "-":
        problem = why_unwritable(args.audit)
        if problem is not None:  # before any repair: every one must be in the trail
            log.error("reconcile: error: --audit %s", problem)
            return FAILED
    audit = AuditLog(args.audit) if args.audit else None
    progress, stop = _progress_printer(not args.quiet and sys.stderr.isatty())
    reconciler = Reconciler(
        targets,
        repair=args.repair,
        page_keys=args.page_keys,
        timeout_s=args.timeout,
        progress=progress,
        audit=audit,
        fold=args.fold,
        fold_wait_s=args.fold_wait,
    )
    stopped_by: list[signal.Signals] = []
    try:
        report = asyncio.run(_run_until_signalled(reconciler, stopped_by))
    finally:
        stop()
        if audit is not None:
            audit.close()
            if audit.write_errors or audit.dropped:
                log.warning(
                    "reconcile: the audit trail %s missed %d write(s)",
                    args.audit,
                    audit.dropped + audit.write_errors,
                )
    if stopped_by:
        # a Ctrl-C, or a CronJob's deadline (TERM): what was compared and pushed stands
        log.error(
            "reconcile: stopped by %s after %d of %d ranges; the repairs pushed so far "
            "stand, run it again to finish",
            stopped_by[0].name,
            report.ranges_done,
            sync.RANGES,
        )
    if args.format == "json":
        out.write(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    else:
        render_table(report, out)
    out.flush()
    return 128 + stopped_by[0] if stopped_by else report.status


async def _run_until_signalled(reconciler: Reconciler, stopped_by: list[signal.Signals]) -> Report:
    """``reconciler.run()``; SIGINT and SIGTERM cancel it, and its report so far is
    returned (``stopped_by`` says which signal)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await reconciler.run()
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        return reconciler.report
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

"""The Redis store: one region's bucket state in Redis, changed only by atomic scripts.

This module owns the Lua scripts (package data: ``lua/*.lua`` beside it, read
with importlib.resources) and the asyncio client that calls them. The scripts
implement exactly the math of ``bucket.py`` (GCRA in the replicated
form: config last-writer-wins by (hlc, origin), epoch, the ``base`` (version,
time) max-register, ``used`` per replica); ``tests/test_redis_store.py`` checks
them against ``bucket.py`` with Hypothesis on a real redis-server.

Layout, one Redis hash per bucket, ``bm:<region>:{<key>}`` (hash-tagged so one
bucket lives in one Cluster slot):

``es`` ``en``  epoch, split into whole seconds and nanoseconds
``c`` ``i`` ``l`` ``m``  capacity, emission interval (ns), ttl (ns), mode
``vh`` ``vo``  config version: HLC (decimal string) and origin
``s``  ``1`` while the config is shadow (``BucketConfig.shadow``; absent: not shadow),
    written with the config, in the same last-writer-wins register
``bh`` ``bo`` ``bt`` ``bu``  base version, base time in ns *relative to the epoch*,
    and the tokens used at it (bucket.py: "full at bt with bu spent")
``t``  Σ used;  ``u:<replica id>``  used per replica;  ``r``  rule name
``a:<replica id>``  its anchor: "time,used then,used when its slice began"
``k:<replica id>``  its marks: "first grant in a slice,used before,..." (times relative
    to the epoch)
``f:<region/node>``  a fold record "W,F": that node's incarnations below W folded into
    F tokens, counted in ``t`` without entries (``Bucket.fold``; merge.lua joins them)

The scripts compute the merged TAT from every replica's records exactly as
``Bucket._recompute`` does (a sweep over the record points), once per bucket and
call, and keep it as bucket.py does while a grant writes no record: no cached
value is stored in Redis, so there is nothing to keep consistent.

Lua numbers are doubles: an absolute nanosecond time (~1.8e18) does not fit
in 53 bits, so every time inside a script is relative to the bucket's epoch
and the epoch itself only ever travels as (seconds, nanoseconds). Relative
values stay exact while they are below 2^53 ns (104 days since the epoch of a
bucket that never went idle for its ttl) and while capacity × interval is
(the config check bounds that). Divisions are floor divisions corrected by
their remainder, so no rounding of ``a / b`` can flip a result. Strings are
compared byte by byte (Redis sets LC_COLLATE from the environment, and Lua's
``<`` on strings follows it).

Time is an argument (the API node's clock, as with the memory backend). Redis
drops a bucket (PEXPIRE) one second after it has been full for its ttl: that
is what ``Limiter.expire`` does with an idle bucket, and dropping a full
bucket is the same as keeping it.

The store's replica id is ``<region>/redis/<incarnation>``, shared by every
API node of the region. The incarnation lives in Redis (``bm:<region>:
incarnation``, taken with SET NX); the acquire script refuses to run under
another incarnation than the stored one, so after Redis lost its data nodes
take a new incarnation and a wiped counter is never reused under the old id.

Redis Cluster (``redis-cluster://host:port,...``): a call's decisions are split
by slot, one script call per slot, each checking the incarnation's copy in its
own slot (``bm:<region>:inc:{<tag>}``); decisions go over raw connections to the
masters, and an error reply (MOVED/ASK/TRYAGAIN) is finished by redis-py's
cluster client, which follows it. docs/storage-redis.md, "Redis Cluster".
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, NamedTuple
from urllib.parse import unquote, urlsplit

import hiredis
import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from bucketmesh.core.bucket import (
    NS_PER_S,
    Bucket,
    BucketConfig,
    BucketDelta,
    Decision,
    delta_tat,
)

# The largest integer every intermediate value of the scripts must stay below.
EXACT_LIMIT: Final = 2**53

# Statuses of one decision in the acquire script's answer (0: denied).
ALLOWED: Final = 1
RECONFIGURE: Final = 2  # the bucket's config is older than the rule's: adopt it first
INVALID_TOKENS: Final = 3  # tokens > capacity
STALE_INCARNATION: Final = -1


def _script(name: str) -> str:
    """The script ``lua/<name>.lua`` (package data) after ``lua/common.lua``, whose
    helpers (``fdiv``, ``vcmp``, ``load``, ``expire`` ...) are local functions: every
    script carries its own copy. The newline before each part is part of the text
    Redis hashes (SHA1, for EVALSHA): it keeps every script's SHA1 what it was before
    the scripts moved into files, so nodes of both versions share Redis's script cache."""
    lua = resources.files("bucketmesh.storage") / "lua"
    common = (lua / "common.lua").read_text(encoding="utf-8")
    return "\n" + common + "\n" + (lua / f"{name}.lua").read_text(encoding="utf-8")


# acquire.lua. KEYS[1] incarnation key, KEYS[2..] the distinct buckets of the call.
# ARGV: now_s, now_n, replica id, incarnation, rule count, then per rule
# (name, capacity, interval, ttl, mode, version hlc, version origin, epoch_s,
# epoch_n: the epoch a bucket created now gets, shadow 1/0, strict shares 1/0: KEYS then
# ends with each bucket's share hash, in the same order), then ONE string holding every
# decision as "key index, rule index, tokens, group, request, n;": n decisions in a
# row asking the same (few arguments to pack and parse: that is most of the cost of a
# call; a run of one key's asks is one item). Decisions of one group > 0
# are all or nothing: the group is judged and settled whole when the loop reaches
# its first item, against the state the decisions before it left. Decisions of
# one request > 0 (a batch) are charged nothing if any of them asks more than its
# bucket's capacity (the batch is refused whole). Answer: 4 values per decision
# (status, level, retry_after ns, reset_after ns), then 5 per key (capacity,
# interval, mode, rule, shadow 1/0). The last ARGV: how many buckets KEYS names.
ACQUIRE_LUA: Final = _script("acquire")

# merge.lua. KEYS: one bucket per delta. ARGV: now_s, now_n, the store's replica id,
# then per delta: es, en, c, i, l, m, vh, vo, bh, bo, bt (relative to the delta's
# epoch), bu, r, expired (1/0), shadow (1/0), n, n (replica id, used) pairs, n, n (replica id,
# anchor time, anchor used, used when its slice began), n, n (replica id,
# "point,before,...") pairs, n, n (region/node, watermark, folded tokens) fold records
# (times relative to the epoch). Answer: how many buckets changed.
MERGE_LUA: Final = _script("merge")

# bump.lua and slot.lua (Redis Cluster, plain scripts): take a new incarnation in
# place of a given one, and copy the incarnation into one slot's key.
BUMP_LUA: Final = (resources.files("bucketmesh.storage") / "lua" / "bump.lua").read_text("utf-8")
SLOT_LUA: Final = (resources.files("bucketmesh.storage") / "lua" / "slot.lua").read_text("utf-8")

# share.lua and lease.lua (plain scripts): a strict key's share hash written by its
# region's writer when nobody wrote since it read it, and the writer's lease.
SHARE_LUA: Final = (resources.files("bucketmesh.storage") / "lua" / "share.lua").read_text("utf-8")
LEASE_LUA: Final = (resources.files("bucketmesh.storage") / "lua" / "lease.lua").read_text("utf-8")

# rule.lua. KEYS[1] the rules hash. ARGV: name, version hlc, version origin, encoded
# config. Last writer wins by version; answers 1 when the stored config changed.
RULE_LUA: Final = _script("rule")


if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout  # no task per call, unlike wait_for before 3.12
else:  # pragma: no cover - Python 3.10

    @contextlib.asynccontextmanager
    async def _timeout(seconds: float) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None
        handle = asyncio.get_running_loop().call_later(seconds, task.cancel)
        try:
            yield
        except asyncio.CancelledError:
            raise asyncio.TimeoutError from None
        finally:
            handle.cancel()


class _StoreError(Exception):
    """``verdicts``: on Redis Cluster, an acquire split into one call per slot may fail
    in some slots only; the verdicts the others answered (None where a slot failed)
    keep their answer, so nothing is decided (or charged) twice."""

    def __init__(self, message: str, verdicts: list[Verdict | None] | None = None) -> None:
        super().__init__(message)
        self.verdicts = verdicts


class StoreUnavailable(_StoreError):
    """Redis did not answer in time, refused, or failed: the failure policy decides."""


class StaleIncarnation(_StoreError):
    """The incarnation in Redis is not the one this node runs under (Redis lost its data)."""


CLUSTER_SCHEMES: Final = ("redis-cluster", "rediss-cluster")
CLUSTER_CALLS: Final = 16  # script calls of one batch in flight at once (one per slot)
SLOTS: Final = 16384


@dataclass(frozen=True)
class ClusterUrl:
    """``redis-cluster://[user:password@]host:port[,host:port...]`` (``rediss-cluster``:
    TLS): the startup nodes of a Redis Cluster; the client learns the rest from them."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool


def parse_cluster_url(url: str) -> ClusterUrl:
    """The parts of a cluster URL; ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"must start with redis-cluster:// or rediss-cluster://, got {url!r}")
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        user, _, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
    if parts.path not in ("", "/", "/0"):
        raise ValueError(
            f"must name no database (Redis Cluster has database 0 only), got {parts.path!r}"
        )
    nodes = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"must list the cluster's nodes as host:port[,host:port...], got {item!r}"
            )
        nodes.append((host.strip("[]"), int(port)))
    return ClusterUrl(tuple(nodes), username, password, parts.scheme == "rediss-cluster")


_slot_tags: list[str] = []


def slot_tag(slot: int) -> str:
    """A short string whose Redis Cluster hash slot is ``slot`` (a hash tag for it)."""
    if not _slot_tags:
        tags: list[str | None] = [None] * SLOTS
        left = SLOTS
        n = 0
        while left:
            text = str(n)
            s = key_slot(text.encode())
            if tags[s] is None:
                tags[s] = text
                left -= 1
            n += 1
        _slot_tags.extend(t for t in tags if t is not None)
    return _slot_tags[slot]


class Verdict(NamedTuple):
    """One decision as the acquire script answered it. A named tuple: one is made per
    decision on the hot path, from a slice of the reply and the key's part of it."""

    status: int
    level: int
    retry_ns: int
    reset_ns: int
    capacity: int
    interval_ns: int
    mode: str
    rule: str
    shadow: bool = False  # the bucket's config is shadow (its ``s`` field)

    def decision(self, key: str) -> Decision:
        return Decision(
            self.status == ALLOWED,
            key,
            self.level,
            self.capacity,
            NS_PER_S / self.interval_ns,
            self.retry_ns / NS_PER_S,
            self.reset_ns / NS_PER_S,
            self.mode,
            self.rule,
        )


_tuple_new = tuple.__new__


class Ask(NamedTuple):
    """One decision to make: ``tokens`` from ``key`` under ``config`` (the rule's, as
    this node knows it). ``group`` > 0 joins an all-or-nothing group of one call;
    ``request`` > 0 names the batch it belongs to (charged nothing if one of its items
    asks more than its bucket's capacity). A named tuple: one is made per decision on
    the hot path, and a frozen dataclass costs several times as much to build."""

    key: str
    rule: str
    config: BucketConfig
    tokens: int
    group: int = 0
    request: int = 0
    #: a strict key of a region in the rights ledger: a new bucket takes the share
    #: its region's writer set (the share hash), and its config is never "stale"
    shares: bool = False


def _split(ns: int) -> tuple[int, int]:
    return ns // NS_PER_S, ns % NS_PER_S


def check_exact(config: BucketConfig) -> str | None:
    """Why ``config`` is out of the range the scripts compute exactly, or None."""
    if config.capacity * config.interval_ns + config.ttl_ns >= EXACT_LIMIT // 4:
        return (
            "capacity × (1/refillRate) + ttl must stay below 2^51 ns (~26 days) "
            "for the redis backend's exact arithmetic"
        )
    return None


def _pack_python(args: Sequence[Any]) -> bytes:
    """One command in RESP: the reference (every argument as ``str()`` gives it)."""
    parts = [arg if isinstance(arg, bytes) else str(arg).encode() for arg in args]
    return b"*%d\r\n" % len(parts) + b"".join([b"$%d\r\n%s\r\n" % (len(p), p) for p in parts])


_pack_command: Any = getattr(hiredis, "pack_command", None)  # hiredis >= 2.1: C


def _pack(args: Sequence[Any]) -> bytes:
    """One command in RESP; hiredis packs it in C where it can (str, int and bytes
    arguments, the only kinds the link sends: the same bytes as ``_pack_python``,
    tests/test_redis_store.py), anything else (a bool) takes the reference."""
    if _pack_command is not None:
        try:
            return _pack_command(tuple(args))  # type: ignore[no-any-return]
        except TypeError:
            pass
    return _pack_python(args)


class _Link(asyncio.Protocol):
    """One raw connection for the decision script: commands pipelined, replies in order.

    redis-py costs ~150 µs of CPU per command in its asyncio client (pool, locks,
    retries); the hot path needs one write and one hiredis parse per call."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: Any = None  # an asyncio or uvloop transport
        self.lost = False
        #: every command must be answered within this (None: no watch), else the link
        #: fails whole: one timer per link, not one per call (``_watch``)
        self.timeout_s = timeout_s
        self.deadlines: deque[float] = deque()  # per waiter, in order
        self.watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        timed = self.timeout_s is not None
        while (reply := self.reader.gets()) is not False:
            waiter = waiters.popleft()
            if timed:
                self.deadlines.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"connection to Redis lost ({exc})"))

    def fail(self, error: Exception) -> None:
        """The link is unusable from now on: every waiter gets ``error``."""
        self.lost = True
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        self.deadlines.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, args: Sequence[Any]) -> asyncio.Future[Any]:
        if self.lost or self.transport is None:
            raise ConnectionError("connection to Redis lost")
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        timeout_s = self.timeout_s
        if timeout_s is not None:
            deadline = loop.time() + timeout_s
            self.deadlines.append(deadline)
            if self.watch is None:
                self.watch = loop.call_at(deadline, self._watch)
        self.transport.write(_pack(args))
        return waiter

    def _watch(self) -> None:
        """The oldest unanswered command's deadline: past it, the link fails (its
        replies may never come; a later one would be taken for an earlier one's);
        else the watch waits for it. Replies come in order, so the oldest waiter has
        the earliest deadline."""
        self.watch = None
        if not self.deadlines or self.lost:
            return
        loop = asyncio.get_running_loop()
        first = self.deadlines[0]
        if first <= loop.time():
            assert self.timeout_s is not None
            self.close()
            self.fail(TimeoutError(f"no reply from Redis within {self.timeout_s * 1000:g} ms"))
            return
        self.watch = loop.call_at(first, self._watch)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


class RedisStore:
    """The scripts of one region's store: the decision script on a raw pipelined
    connection, everything else through redis-py's small connection pool."""

    def __init__(
        self, url: str, region: str, *, timeout_s: float = 0.05, connections: int = 4
    ) -> None:
        self.region = region
        self.timeout_s = timeout_s
        self.prefix = f"bm:{region}:"
        self.incarnation_key = f"bm:{region}:incarnation"
        self.rules_key = f"bm:{region}:rules"
        # Redis Cluster: the incarnation is copied into one key per slot (hash-tagged
        # into it), so each per-slot script call checks its own slot's copy; the
        # "filled" marker says every slot had it (a missing one then means lost data).
        self.filled_key = f"bm:{region}:incarnation:filled"
        self.cluster = urlsplit(url).scheme in CLUSTER_SCHEMES
        # a slot answered with another incarnation (or none): the next join takes a new one
        self.slot_lost = False
        self.redis: Any
        if self.cluster:
            parsed = parse_cluster_url(url)
            self.redis = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
                username=parsed.username,
                password=parsed.password,
                ssl=parsed.tls,
                decode_responses=True,
                socket_timeout=max(timeout_s * 4, 0.5),
                socket_connect_timeout=max(timeout_s * 4, 0.5),
                # per node; a call's slots run concurrently, at most CLUSTER_CALLS
                max_connections=CLUSTER_CALLS + connections + 2,
            )
        else:
            self.redis = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=max(timeout_s * 4, 0.5),
                socket_connect_timeout=max(timeout_s * 4, 0.5),
                max_connections=connections + 2,
            )
        self._acquire = self.redis.register_script(ACQUIRE_LUA)
        self._merge = self.redis.register_script(MERGE_LUA)
        self._rule = self.redis.register_script(RULE_LUA)
        self._bump = self.redis.register_script(BUMP_LUA)
        self._share = self.redis.register_script(SHARE_LUA)
        self._lease = self.redis.register_script(LEASE_LUA)
        self.share_keys_key = f"bm:{region}:sh-keys"
        #: every node incarnation (``region/node/N``) a node of this region heard from:
        #: older ones' strict gifts are frozen at the region's writer (RegionShares)
        self.share_newest_key = f"bm:{region}:sh-newest"
        self.share_lease_key = f"bm:{region}:sh-writer"
        self.slot_calls = asyncio.Semaphore(CLUSTER_CALLS)
        self.incarnation: str | None = None
        self.calls = 0
        self.failures = 0
        # TLS (rediss://) and Cluster stay on redis-py (which follows MOVED/ASK and
        # failovers); plain TCP and unix sockets get the raw link.
        self.raw = not self.cluster and self.redis.connection_pool.connection_class in (
            aioredis.Connection,
            aioredis.UnixDomainSocketConnection,
        )
        self.params = {} if self.cluster else self.redis.connection_pool.connection_kwargs
        # Cluster without TLS: decisions on raw connections to the masters (one each)
        self.cluster_raw = self.cluster and not parse_cluster_url(url).tls
        self.node_links: dict[str, _Link] = {}
        self.auth: list[str] = []
        self.redirected = 0  # cluster calls redis-py had to finish (redirections)
        if self.cluster:
            parsed = parse_cluster_url(url)
            if parsed.password:
                self.auth = [parsed.password]
                if parsed.username:
                    self.auth.insert(0, parsed.username)
        self.link: _Link | None = None
        self.link_lock = asyncio.Lock()

    @property
    def replica_id(self) -> str | None:
        return None if self.incarnation is None else f"{self.region}/redis/{self.incarnation}"

    @property
    def timeout_s(self) -> float:
        """Every call's timeout; the raw link's watch takes a change at once."""
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._timeout_s = value
        link = getattr(self, "link", None)
        if link is not None:
            link.timeout_s = value

    def bucket_key(self, key: str) -> str:
        return f"{self.prefix}{{{key}}}"

    def share_key(self, key: str) -> str:
        """The hash of ``key``'s strict rights in this region (hash-tagged like its
        bucket): the share config its writer set, its ledger, the demand counted."""
        return f"{self.prefix}sh:{{{key}}}"

    @staticmethod
    def share_ready_key(incarnation_key: str) -> str:
        """Beside an incarnation key (in its Cluster slot): the incarnation under which
        the region's strict-shares writer rewrote the share hash of every key with a
        ledger (``RegionShares``); while it is not the store's, a strict bucket with no
        share hash is not created (Redis lost its data: docs/sync.md, "Redis regions")."""
        return f"{incarnation_key}:sh-ready"

    def slot_of(self, key: str) -> int:
        """The Cluster slot of ``key``'s bucket (all its state is in that one hash)."""
        return int(key_slot(self.bucket_key(key).encode()))

    def slot_incarnation_key(self, slot: int) -> str:
        return f"{self.prefix}inc:{{{slot_tag(slot)}}}"

    async def _call(self, awaitable: Any, timeout_s: float | None = None) -> Any:
        """Await one Redis call within the timeout; any failure is StoreUnavailable."""
        self.calls += 1
        try:
            async with _timeout(timeout_s or self.timeout_s):
                return await awaitable
        except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as error:
            raise self.unavailable(error) from None

    def unavailable(self, error: BaseException) -> StoreUnavailable:
        """A call failed with ``error``: counted, the raw link(s) dropped (their replies
        may never come), and the StoreUnavailable to raise for it."""
        self.failures += 1
        self.drop_link()
        return StoreUnavailable(f"{type(error).__name__}: {error}")

    async def close(self) -> None:
        self.drop_link()
        await self.redis.aclose()

    def drop_link(self) -> None:
        """Forget the raw connection(s) (after a timeout: their replies may never come)."""
        if self.link is not None:
            self.link.close()
            self.link = None
        for link in self.node_links.values():
            link.close()
        self.node_links.clear()

    async def _node_link(self, host: str, port: int) -> _Link:
        """Cluster: the raw connection to one master (opened on first use)."""
        name = f"{host}:{port}"
        link = self.node_links.get(name)
        if link is not None and not link.lost:
            return link
        _, link = await asyncio.get_running_loop().create_connection(_Link, host, port)
        if self.auth:
            _check(await link.send(["AUTH", *self.auth]))
        old = self.node_links.get(name)
        if old is not None and not old.lost:
            link.close()  # another call opened one meanwhile
            return old
        self.node_links[name] = link
        return link

    async def _run_in_slot(self, script: Any, slot: int, keys: list[str], args: list[Any]) -> Any:
        """Cluster: EVALSHA on a raw connection to the slot's master as the client's map
        knows it; any error reply (MOVED, ASK, TRYAGAIN, CLUSTERDOWN: the script did not
        run) sends the call through redis-py's cluster client instead, which follows the
        redirection and refreshes its map."""
        if self.cluster_raw:
            try:
                node = self.redis.nodes_manager.get_node_from_slot(slot)
            except (RedisClusterException, AttributeError):
                node = None
            if node is not None:
                link = await self._node_link(node.host, node.port)
                command = ["EVALSHA", script.sha, len(keys), *keys, *args]
                reply = await link.send(command)
                if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                    reply = await link.send(["EVAL", script.script, len(keys), *keys, *args])
                if not isinstance(reply, hiredis.ReplyError):
                    return reply
                self.redirected += 1
        return await script(keys=keys, args=args)

    async def _open_link(self) -> _Link:
        link = self.link
        if link is not None and not link.lost:
            return link
        async with self.link_lock:
            if self.link is not None and not self.link.lost:
                return self.link
            loop = asyncio.get_running_loop()
            params = self.params

            def timed() -> _Link:
                return _Link(self.timeout_s)

            if "path" in params:
                _, link = await loop.create_unix_connection(timed, params["path"])
            else:
                _, link = await loop.create_connection(
                    timed, params.get("host", "localhost"), params.get("port", 6379)
                )
            if params.get("password"):
                auth = [params["password"]]
                if params.get("username"):
                    auth.insert(0, params["username"])
                _check(await link.send(["AUTH", *auth]))
            if params.get("db"):
                _check(await link.send(["SELECT", params["db"]]))
            self.link = link
            return link

    async def _run_script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA on the raw link; EVAL (which loads it) when Redis answers NOSCRIPT."""
        if not self.raw:
            return await script(keys=keys, args=args)
        link = self.link
        if link is None or link.lost:
            link = await self._open_link()
        reply = await link.send(["EVALSHA", script.sha, len(keys), *keys, *args])
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            reply = await link.send(["EVAL", script.script, len(keys), *keys, *args])
        return _check(reply)

    # -- incarnation -------------------------------------------------------------

    async def join(self, timeout_s: float | None = None) -> str:
        """The store's incarnation: the stored one, or a new one (SET NX) if none is.

        A new one is the time in ms, and above any this node ran under before, so
        an id whose counters Redis lost is never taken again."""
        candidate = time.time_ns() // 1_000_000
        if self.incarnation is not None and self.incarnation.isdigit():
            candidate = max(candidate, int(self.incarnation) + 1)
        lost = self.slot_lost and self.incarnation is not None
        if lost:
            # one slot lost its data (Cluster): a new incarnation for all, unless
            # another node already took one
            bump = self._bump(keys=[self.incarnation_key], args=[self.incarnation, candidate])
            created = bool(await self._call(bump, timeout_s))
        else:
            created = bool(
                await self._call(
                    self.redis.set(self.incarnation_key, str(candidate), nx=True), timeout_s
                )
            )
        value = await self._call(self.redis.get(self.incarnation_key), timeout_s)
        if value is None:
            raise StoreUnavailable("the incarnation key vanished while it was being taken")
        self.incarnation = str(value)
        if self.cluster:
            wait = max(10.0, timeout_s or 0.0)
            marker = await self._call(self.redis.get(self.filled_key), wait)
            filled = await self._fill_slots(self.incarnation, wait)
            if filled and not created and marker == self.incarnation:
                # every slot had it once and one has it no longer: that slot lost its
                # data (a shard wiped while no node ran): never reuse the id there
                self.slot_lost = True
                return await self.join(timeout_s)
            await self._call(self.redis.set(self.filled_key, self.incarnation), wait)
            self.slot_lost = False
        return self.incarnation

    async def _fill_slots(self, incarnation: str, timeout_s: float) -> int:
        """Copy the incarnation into every slot's key (where missing or older), in one
        cluster pipeline; how many were set."""
        pipe = self.redis.pipeline(transaction=False)
        for slot in range(SLOTS):
            pipe.eval(SLOT_LUA, 1, self.slot_incarnation_key(slot), incarnation)
        results = await self._call(pipe.execute(), timeout_s)
        return sum(int(x) for x in results)

    async def current_incarnation(self) -> str | None:
        value = await self._call(self.redis.get(self.incarnation_key))
        return None if value is None else str(value)

    async def ping(self, timeout_s: float | None = None) -> None:
        if self.cluster:
            # every master answers (the client refreshes its map of the cluster
            # after a failed one, so a promoted replica is found)
            await self._call(self.redis.ping(target_nodes=RedisCluster.PRIMARIES), timeout_s)
        else:
            await self._call(self.redis.ping(), timeout_s)

    async def eviction_policy(self, timeout_s: float | None = None) -> str | None:
        """Redis's ``maxmemory-policy``, or None where CONFIG is refused (a managed Redis,
        an ACL without it): that refusal is not a store failure."""
        try:
            async with _timeout(timeout_s or self.timeout_s):
                if self.cluster:
                    found = await self.redis.config_get(
                        "maxmemory-policy", target_nodes=RedisCluster.PRIMARIES
                    )
                else:
                    found = await self.redis.config_get("maxmemory-policy")
        except ResponseError:
            return None
        except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as error:
            raise self.unavailable(error) from None  # counted, as every failed call is
        if isinstance(found, dict) and found and all(isinstance(v, dict) for v in found.values()):
            # one answer per master (Cluster): the first one that is not noeviction
            policies = [str(v.get("maxmemory-policy")) for v in found.values()]
            return next((p for p in policies if p != "noeviction"), policies[0])
        value = found.get("maxmemory-policy") if isinstance(found, dict) else None
        return None if value is None else str(value)

    # -- decisions ---------------------------------------------------------------

    async def acquire(self, asks: Sequence[Ask], now_ns: int) -> list[Verdict]:
        """Decide ``asks`` in order, in one atomic script call (on Redis Cluster: one
        per slot, all sent at once; each key's asks keep their order, and an atomic
        group must be in one slot)."""
        if self.incarnation is None:
            raise StaleIncarnation("no incarnation taken yet")
        if not self.cluster:
            return await self._acquire_call(asks, now_ns, self.incarnation_key)
        by_slot: dict[int, list[int]] = {}
        for j, ask in enumerate(asks):
            by_slot.setdefault(self.slot_of(ask.key), []).append(j)
        if len(by_slot) == 1:
            slot = next(iter(by_slot))
            return await self._acquire_call(asks, now_ns, self.slot_incarnation_key(slot))
        slots = list(by_slot.items())

        async def one(slot: int, js: list[int]) -> list[Verdict]:
            async with self.slot_calls:
                return await self._acquire_call(
                    [asks[j] for j in js], now_ns, self.slot_incarnation_key(slot)
                )

        results = await asyncio.gather(
            *(one(slot, js) for slot, js in slots), return_exceptions=True
        )
        out: list[Verdict | None] = [None] * len(asks)
        failure: BaseException | None = None
        for (_, js), result in zip(slots, results, strict=True):
            if isinstance(result, BaseException):
                if failure is None or isinstance(result, StaleIncarnation):
                    failure = result
                continue
            for j, verdict in zip(js, result, strict=True):
                out[j] = verdict
        if failure is not None:
            if isinstance(failure, _StoreError):
                raise type(failure)(str(failure), out)
            raise failure
        return [v for v in out if v is not None]

    async def _acquire_call(
        self, asks: Sequence[Ask], now_ns: int, incarnation_key: str
    ) -> list[Verdict]:
        """One acquire script call; ``incarnation_key``: the store's, or on Cluster the
        copy in the slot of every key of the call."""
        names, argv, keys = self.acquire_args(asks, now_ns, incarnation_key)
        if self.cluster:
            slot = int(key_slot(incarnation_key.encode()))
            raw = await self._call(self._run_in_slot(self._acquire, slot, names, argv))
        else:
            raw = await self._call(self._run_script(self._acquire, names, argv))
        return self.verdicts(raw, asks, keys)

    def send_acquire(
        self, asks: Sequence[Ask], now_ns: int
    ) -> tuple[asyncio.Future[Any], dict[str, int]] | None:
        """The acquire script call written at once on the open raw link (plain Redis),
        without a coroutine: its reply's future (answered within ``timeout_s``, else
        failed with TimeoutError: the link's watch) and the call's key indexes, for
        ``verdicts`` or a caller reading the reply itself. None where this cannot be
        (Cluster, TLS, the link not open yet or lost, no incarnation): ``acquire``
        then. The reply may be an error reply (NOSCRIPT: the script did not run)."""
        link = self.link
        if link is None or link.lost or not self.raw or self.incarnation is None:
            return None
        names, argv, keys = self.acquire_args(asks, now_ns, self.incarnation_key)
        self.calls += 1
        return link.send(["EVALSHA", self._acquire.sha, len(names), *names, *argv]), keys

    def acquire_args(
        self, asks: Sequence[Ask], now_ns: int, incarnation_key: str
    ) -> tuple[list[str], list[Any], dict[str, int]]:
        """The acquire script's KEYS and ARGV for ``asks``, and each key's index (from 1)."""
        rules: dict[tuple[str, BucketConfig, bool], int] = {}
        keys: dict[str, int] = {}
        args: list[Any] = []
        wanted: list[str] = []
        shares = False
        # consecutive asks of one rule share its config object: its index is kept
        # without hashing the config again (an equal config in another object only
        # costs a duplicate rule entry in the call)
        last: Ask | None = None
        rule_index = 0
        item = ""
        run = 0  # how many times in a row ``last`` was asked: one item for the run
        for ask in asks:
            if ask is last:
                # the same Ask again (RedisBackend reuses a key's): the same run
                run += 1
                continue
            if run > 1:
                wanted[-1] = f"{item[:-2]}{run};"  # the item ends in its count, 1
            if (
                last is None
                or ask.config is not last.config
                or ask.rule != last.rule
                or ask.shares != last.shares
            ):
                found = rules.get((ask.rule, ask.config, ask.shares))
                if found is None:
                    found = rules[(ask.rule, ask.config, ask.shares)] = len(rules) + 1
                    shares = shares or ask.shares
                    cfg = ask.config
                    epoch_s, epoch_n = _split(now_ns - now_ns % cfg.ttl_ns)
                    args += [
                        ask.rule,
                        cfg.capacity,
                        cfg.interval_ns,
                        cfg.ttl_ns,
                        cfg.mode,
                        str(cfg.version[0]),
                        cfg.version[1],
                        epoch_s,
                        epoch_n,
                        1 if cfg.shadow else 0,
                        1 if ask.shares else 0,
                    ]
                rule_index = found
            last = ask
            key_index = keys.get(ask.key)
            if key_index is None:
                key_index = keys[ask.key] = len(keys) + 1
            item = f"{key_index},{rule_index},{ask.tokens},{ask.group},{ask.request},1;"
            wanted.append(item)
            run = 1
        if run > 1:
            wanted[-1] = f"{item[:-2]}{run};"
        now_s, now_n = _split(now_ns)
        head: list[Any] = [now_s, now_n, self.replica_id, self.incarnation, len(rules)]
        prefix = self.prefix
        names = [incarnation_key, *(f"{prefix}{{{key}}}" for key in keys)]
        if shares:  # each bucket's share hash after the buckets (same slot: its tag)
            names += [self.share_key(key) for key in keys]
            names.append(self.share_ready_key(incarnation_key))
        return names, [*head, *args, "".join(wanted), len(keys)], keys

    def verdicts(self, raw: Any, asks: Sequence[Ask], keys: dict[str, int]) -> list[Verdict]:
        """The acquire script's reply for ``asks`` as one Verdict each; StaleIncarnation
        when the script refused to run under this incarnation."""
        if len(raw) == 1 and raw[0] == STALE_INCARNATION:
            if self.cluster:
                self.slot_lost = True
            raise StaleIncarnation("Redis holds another incarnation (it lost its data?)")
        # each key's part of the answer (capacity, interval, mode, rule, shadow) once,
        # then one verdict per decision: its 4 values and its key's part
        base = 4 * len(asks)
        parts = []
        for k in range(len(keys)):
            c = base + 5 * k
            parts.append([raw[c], raw[c + 1], raw[c + 2], raw[c + 3], raw[c + 4] == 1])
        return [
            _tuple_new(Verdict, raw[4 * j : 4 * j + 4] + parts[keys[ask.key] - 1])
            for j, ask in enumerate(asks)
        ]

    # -- replication ---------------------------------------------------------------

    async def merge(self, deltas: Iterable[BucketDelta], now_ns: int) -> int:
        """Join ``deltas`` into the store (absolute values: repeating one is harmless)."""
        keys: list[str] = []
        head: list[Any] = [*_split(now_ns), self.replica_id or ""]
        args: list[Any] = []
        slots: dict[int, tuple[list[str], list[Any]]] = {}
        for delta in deltas:
            if delta.epoch == 0:
                continue  # a strict key's config-only delta (limiter.py): no bucket state
            cfg = delta.config
            expired = delta_tat(delta) + cfg.ttl_ns <= now_ns
            epoch = delta.epoch
            if self.cluster:
                # one call per slot (a script's keys must share one)
                keys, args = slots.setdefault(self.slot_of(delta.key), ([], []))
            keys.append(self.bucket_key(delta.key))
            args += [
                *_split(epoch),
                cfg.capacity,
                cfg.interval_ns,
                cfg.ttl_ns,
                cfg.mode,
                str(cfg.version[0]),
                cfg.version[1],
                str(delta.base_version[0]),
                delta.base_version[1],
                delta.base_time - epoch,
                delta.base_used,
                delta.rule,
                1 if expired else 0,
                1 if cfg.shadow else 0,
                len(delta.used),
            ]
            for rid, value in delta.used.items():
                args += [rid, value]
            args.append(len(delta.anchors))
            for rid, (point, before, begun) in delta.anchors.items():
                args += [rid, point - epoch, before, begun]
            marks = {rid: m for rid, m in delta.marks.items() if m}
            args.append(len(marks))
            for rid, flat in marks.items():
                shifted = [value - epoch if j % 2 == 0 else value for j, value in enumerate(flat)]
                args += [rid, ",".join(map(str, shifted))]
            args.append(len(delta.folds))
            for node, (watermark, tokens) in delta.folds.items():
                args += [node, watermark, tokens]
        if self.cluster:

            async def one(keys: list[str], args: list[Any]) -> Any:
                async with self.slot_calls:
                    return await self._call(self._merge(keys=keys, args=[*head, *args]))

            counts = await asyncio.gather(
                *(one(k, a) for k, a in slots.values()), return_exceptions=True
            )
            total = 0
            for count in counts:
                if isinstance(count, BaseException):
                    raise count
                total += int(count)
            return total
        if not keys:
            return 0
        return int(await self._call(self._merge(keys=keys, args=[*head, *args])))

    async def merge_remote(
        self, deltas: Sequence[BucketDelta], now_ns: int, replica_id: str
    ) -> int:
        """Join a peer's deltas as ``Limiter.merge`` does: a delta of the same epoch
        with a newer per-key config is adopted here first, keeping the level Redis
        holds now (``Bucket.reconfigure``), so a base proposed elsewhere before this
        region drained the bucket cannot hand back refill it already forgot."""
        newer = [d for d in deltas if d.epoch and d.config.version[0] > 0]
        proposals: list[BucketDelta] = []
        if newer:
            stored = {state.key: state for state in await self.read([d.key for d in newer])}
            for delta in newer:
                state = stored.get(delta.key)
                if (
                    state is not None
                    and state.epoch == delta.epoch
                    and delta.config.version > state.config.version
                ):
                    bucket = Bucket.from_delta(state, replica_id)
                    bucket.reconfigure(delta.config, now_ns)
                    stored[delta.key] = bucket.full_state(delta.key, replica_id)
                    proposals.append(stored[delta.key])
        return await self.merge([*proposals, *deltas], now_ns)

    async def read(self, keys: Sequence[str]) -> list[BucketDelta]:
        """The full state of ``keys`` as stored (missing ones left out), in one pipeline."""
        if not keys:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self.bucket_key(key))
        rows = await self._call(pipe.execute())
        return [d for d in (parse_bucket(k, row) for k, row in zip(keys, rows, strict=True)) if d]

    # -- strict shares: the region's rights ledger (redis_backend.RegionShares) ----------

    async def share_lease(self, node: str, lease_ms: int) -> bool:
        """Take or renew the region's strict-shares writer lease for ``node``."""
        args = [node, lease_ms]
        return bool(await self._call(self._lease(keys=[self.share_lease_key], args=args)))

    async def push_shares(
        self, asked: dict[str, int], denied: Iterable[str], ledgers: dict[str, tuple[str, str]]
    ) -> None:
        """Add this node's demand (tokens asked) and denials to each key's share hash,
        and put the ledgers it heard from peers (field, encoded state) there, for the
        region's writer."""
        keys = set(asked) | set(denied) | set(ledgers)
        if not keys:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key, tokens in asked.items():
            pipe.hincrby(self.share_key(key), "a", tokens)
        for key in denied:
            pipe.hset(self.share_key(key), "n", "1")
        for key, (field, encoded) in ledgers.items():
            pipe.hset(self.share_key(key), field, encoded)
        pipe.sadd(self.share_keys_key, *keys)
        await self._call(pipe.execute())

    async def push_newest(self, replicas: Iterable[str]) -> None:
        """Add the node incarnations a node heard from (grow-only: a set) for the
        region's writer, which freezes their older incarnations' gifts."""
        names = list(replicas)
        if names:
            await self._call(self.redis.sadd(self.share_newest_key, *names))

    async def read_newest(self) -> set[str]:
        """Every node incarnation a node of the region put with ``push_newest``."""
        names = await self._call(self.redis.smembers(self.share_newest_key))
        return {str(name) for name in names}

    async def read_shares(self) -> dict[str, dict[str, str]]:
        """Every strict key's share hash of the region (the writer's round)."""
        names = sorted(await self._call(self.redis.smembers(self.share_keys_key)))
        if not names:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for key in names:
            pipe.hgetall(self.share_key(key))
        rows = await self._call(pipe.execute())
        return dict(zip(names, rows, strict=True))

    async def take_demand(self, taken: dict[str, tuple[int, bool]]) -> None:
        """Subtract the demand the writer read (increments since stay) and clear the
        denials it saw."""
        if not taken:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key, (tokens, denied) in taken.items():
            if tokens:
                pipe.hincrby(self.share_key(key), "a", -tokens)
            if denied:
                pipe.hdel(self.share_key(key), "n")
        await self._call(pipe.execute())

    async def save_key_config(self, key: str, config: BucketConfig) -> bool:
        """A strict key's own whole config into its share hash (``v:K`` ``o:K`` ``c:K``),
        the newest by version (rule.lua), for the region's writer."""
        encoded = msgspec.json.encode(config).decode()
        args = ["K", str(config.version[0]), config.version[1], encoded]
        return bool(await self._call(self._rule(keys=[self.share_key(key)], args=args)))

    async def write_share(self, key: str, seq: int, fields: dict[str, str]) -> int:
        """share.lua: the new sequence number, or -1 when written since ``seq``."""
        args: list[Any] = [seq]
        for name, value in fields.items():
            args += [name, value]
        return int(await self._call(self._share(keys=[self.share_key(key)], args=args)))

    async def shares_ready(self) -> str | None:
        """The incarnation under which the writer last marked every share hash written
        (``share_ready_key``; on Cluster, slot 0's copy: they are set together)."""
        key = self.slot_incarnation_key(0) if self.cluster else self.incarnation_key
        value = await self._call(self.redis.get(self.share_ready_key(key)))
        return None if value is None else str(value)

    async def mark_shares_ready(self, incarnation: str) -> None:
        """Every key with a ledger has its share hash under ``incarnation`` (on Cluster,
        one copy per slot, each read by the acquire script of its slot)."""
        if not self.cluster:
            await self._call(
                self.redis.set(self.share_ready_key(self.incarnation_key), incarnation)
            )
            return
        pipe = self.redis.pipeline(transaction=False)
        for slot in range(SLOTS):
            pipe.set(self.share_ready_key(self.slot_incarnation_key(slot)), incarnation)
        await self._call(pipe.execute(), max(10.0, self.timeout_s))

    async def save_rule(self, name: str, config: BucketConfig) -> bool:
        encoded = msgspec.json.encode(config).decode()
        args = [name, str(config.version[0]), config.version[1], encoded]
        return bool(await self._call(self._rule(keys=[self.rules_key], args=args)))

    async def load_rules(self) -> dict[str, BucketConfig]:
        raw = await self._call(self.redis.hgetall(self.rules_key))
        out = {}
        for field, value in raw.items():
            if field.startswith("c:"):
                out[field[2:]] = msgspec.json.decode(value, type=BucketConfig)
        return out


def _check(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        raise RedisError(str(reply))
    return reply


def parse_bucket(key: str, row: dict[str, str]) -> BucketDelta | None:
    """A stored hash as the full-state delta ``bucket.py`` would hold for it."""
    if not row or "es" not in row:
        return None
    epoch = int(row["es"]) * NS_PER_S + int(row["en"])
    config = BucketConfig(
        int(row["c"]),
        int(row["i"]),
        int(row["l"]),
        row["m"],
        (int(row["vh"]), row["vo"]),
        row.get("s") == "1",
    )
    used = {field[2:]: int(value) for field, value in row.items() if field.startswith("u:")}
    anchor_at: dict[str, int] = {}
    anchor_used: dict[str, int] = {}
    anchor_begun: dict[str, int] = {}
    marks: dict[str, tuple[int, ...]] = {}
    folds: dict[str, tuple[int, int]] = {}
    for field, value in row.items():
        if field.startswith("a:"):
            point, before, begun = (int(x) for x in value.split(","))
            rid = field[2:]
            anchor_at[rid], anchor_used[rid], anchor_begun[rid] = epoch + point, before, begun
        elif field.startswith("k:"):
            flat = [int(x) for x in value.split(",")]
            marks[field[2:]] = tuple(epoch + x if j % 2 == 0 else x for j, x in enumerate(flat))
        elif field.startswith("f:"):
            watermark, tokens = (int(x) for x in value.split(","))
            folds[field[2:]] = (watermark, tokens)
    return BucketDelta(
        key,
        epoch,
        config,
        (int(row["bh"]), row["bo"]),
        epoch + int(row["bt"]),
        used,
        row.get("r", ""),
        int(row.get("bu", "0")),
        anchor_at,
        anchor_used,
        anchor_begun,
        marks,
        folds=folds,
    )

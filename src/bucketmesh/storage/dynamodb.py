"""DynamoDB as durable storage for nodes without a persistent volume.

``storage.snapshot: dynamodb://<table>?region=<aws region>``, optionally with
``&endpoint=<url>``, ``&interval=<ms>`` and ``&dir=<path>``.

The embedded store keeps working exactly as with a snapshot file (``memory.py``,
``snapshot.py``, ``wal.py``), on a scratch directory (``dir``, default
``$TMPDIR/bucketmesh-<region>.<node>``) that need not survive the pod. A
``DynamoState`` copies those files to a DynamoDB table and back:

start-up (``restore``, before the store opens)
    the scratch directory's state files are replaced by the table's copy: the latest
    snapshot and every write-ahead log segment checkpointed since, and a one-frame
    segment naming the incarnation the table last recorded (see below). The store
    then opens them as it opens its own files: replay, and a **new incarnation**
    above every one named.
``claim`` (before the node listens)
    a conditional write records the new incarnation in the node's owner item, on
    condition that the item still holds what ``restore`` read. Two nodes started
    with one identity (``<region>/<node>``) from the same state cannot both win:
    the loser refuses to start. A node started later wins (it read the newer item),
    and the older one's next conditional write fails: it is **fenced**, writes
    nothing more to the table, and its readiness fails (the supervisor's
    ``dynamodb`` task), so neither ever overwrites the other's incarnation.
``checkpoint`` (a supervised task every ``interval``, default 1000 ms; also at stop)
    the log segments' new bytes are put as items of their own (never overwritten:
    ``attribute_not_exists``), a snapshot the node wrote since the last round is put
    in chunks and made current by a conditional update of the owner item, and then
    the items of segments that snapshot covers are deleted. Every round ends with a
    conditional update of the owner item, so a fenced node learns it within one
    interval.

No request waits on DynamoDB: decisions commit to the scratch directory's log as
they do on a volume (``durability``), and every DynamoDB call runs in a worker
thread of the checkpoint task. **The durability window** is therefore what the
table has not received yet: grants of the last ``interval`` plus the round's own
duration (``bucketmesh_dynamodb_unsaved_bytes`` shows it; 0 when caught up). A
kill -9 of a node without a volume loses at most that window of its own grants —
and not even those when a peer region had received them (a node pulls its peers'
state at start-up, docs/sync.md). Within the window the new incarnation never
grants a token twice *by reusing a counter*: its incarnation is above every one
the table recorded, and the one-frame segment carries the last claimed
incarnation even when its life checkpointed nothing.

Items (partition key ``pk`` = ``<region>/<node>``, sort key ``sk``, both strings):

``owner``                                    ``inc`` (number), ``snap`` (current
                                             snapshot's prefix), ``chunks``, ``at``
``snap#<inc>#<gen>#<chunk>``                 a snapshot file's bytes, in chunks
``seg#<inc>#<seq>#<offset>``                 bytes of one log segment from offset

Items are at most ``CHUNK_BYTES`` (DynamoDB's item limit is 400 KB). The table
(on-demand, ``pk`` HASH + ``sk`` RANGE, both S) is created by the operator;
``create_table`` does it for tests and scripts. Credentials come from boto3's
standard chain (environment, shared config, web identity / IRSA, instance
metadata); ``endpoint`` points at a DynamoDB-compatible server instead of AWS.

Blocking (boto3): every method but ``checkpoint`` is called at start-up, before the
node serves anything; ``checkpoint`` runs the blocking round in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from bucketmesh.core.limiter import DeltaBatch
from bucketmesh.storage.memory import StateLock, StateLocked
from bucketmesh.storage.wal import frame, segments
from bucketmesh.telemetry.log import logger
from bucketmesh.telemetry.metrics import NodeMetrics

log = logger("dynamodb")

SCHEME: Final = "dynamodb://"
#: An AWS region name as botocore accepts it (botocore.utils.validate_region_name).
_AWS_REGION: Final = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9\-]{0,61}[a-zA-Z0-9])?")
#: Bytes of one item's payload: under DynamoDB's 400 KB item limit with room for keys.
CHUNK_BYTES: Final = 350_000
DEFAULT_INTERVAL_MS: Final = 1000
#: The local copy of the state files in the scratch directory.
STATE_FILE: Final = "state.snapshot"
OWNER: Final = "owner"


class DynamoError(OSError):
    """The table cannot be used (unreachable, missing, refused): the message says why.
    An OSError: the environment's fault, not a bug (the supervisor logs one line)."""


class Fenced(DynamoError):
    """Another node with this identity took the table's owner item over."""


def is_uri(text: str | None) -> bool:
    return bool(text) and str(text).startswith(SCHEME)


@dataclass(frozen=True)
class Target:
    """Where a ``dynamodb://`` URI points."""

    table: str
    region: str | None
    endpoint: str | None
    interval_s: float
    directory: str | None


def parse_uri(uri: str) -> Target:
    """``dynamodb://table?region=...&endpoint=...&interval=ms&dir=path``; ValueError
    names what is wrong."""
    if not uri.startswith(SCHEME):
        raise ValueError(f"must start with {SCHEME}, got {uri!r}")
    parts = urlsplit(uri)
    table = parts.netloc
    if not table or not all(c.isalnum() or c in "_.-" for c in table) or len(table) < 3:
        raise ValueError(
            f"needs a table name of 3 to 255 letters, digits, _ . or - after {SCHEME}, got {uri!r}"
        )
    if parts.path not in ("", "/"):
        raise ValueError(f"takes no path after the table name, got {parts.path!r}")
    known = {"region", "endpoint", "interval", "dir"}
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    for name, values in query.items():
        if name not in known:
            raise ValueError(
                f"has an unknown parameter {name!r} (known: {', '.join(sorted(known))})"
            )
        if len(values) != 1 or not values[0]:
            raise ValueError(f"needs one non-empty value for {name!r}")
    endpoint = query.get("endpoint", [None])[0]
    if endpoint is not None and (
        urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).hostname
    ):
        raise ValueError(
            f"endpoint must be an http:// or https:// URL with a host, got {endpoint!r}"
        )
    region = query.get("region", [None])[0]
    if region is not None and _AWS_REGION.fullmatch(region) is None:
        raise ValueError(f"region must be an AWS region name such as us-east-1, got {region!r}")
    interval_ms = DEFAULT_INTERVAL_MS
    if "interval" in query:
        text = query["interval"][0]
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"interval must be a whole number of ms >= 1, got {text!r}")
        interval_ms = int(text)
    return Target(
        table=table,
        region=region,
        endpoint=endpoint,
        interval_s=interval_ms / 1000,
        directory=query.get("dir", [None])[0],
    )


def _client(target: Target) -> Any:
    try:
        import boto3
    except ImportError:  # pragma: no cover - an install without the extra
        raise DynamoError(
            "storage.snapshot is a dynamodb:// URI but boto3 is not installed: "
            "pip install 'bucketmesh[dynamodb]'"
        ) from None
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    session = boto3.session.Session()
    try:
        return session.client(
            "dynamodb",
            region_name=target.region,
            endpoint_url=target.endpoint,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=2),
        )
    except (BotoCoreError, ValueError) as error:
        # NoRegionError above all: no ?region= and no AWS_REGION / AWS_DEFAULT_REGION
        hint = (
            "; give ?region= in the URI or set AWS_REGION"
            if type(error).__name__ == "NoRegionError"
            else ""
        )
        reason = str(error).rstrip(".")
        raise DynamoError(f"storage.snapshot dynamodb://{target.table}: {reason}{hint}") from None


def create_table(client: Any, table: str) -> None:
    """The table the node expects (on-demand; ``pk`` HASH + ``sk`` RANGE), for tests and
    scripts; docs/storage.md shows the same with the AWS CLI."""
    client.create_table(
        TableName=table,
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    client.get_waiter("table_exists").wait(TableName=table)


def _condition_failed(error: Exception) -> bool:
    response = getattr(error, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in ("ConditionalCheckFailedException", "TransactionCanceledException")


def _incarnation(replica_id: str) -> int:
    last = replica_id.rsplit("/", 1)[-1]
    if not last.isdigit():
        raise ValueError(f"replica id {replica_id!r} has no numeric incarnation")
    return int(last)


class DynamoState:
    """One node's state files, mirrored in a DynamoDB table (see the module docstring)."""

    def __init__(self, target: Target, *, region: str, node: str, client: Any = None) -> None:
        self.target = target
        self.identity = f"{region}/{node}"
        self.interval_s = target.interval_s
        directory = target.directory or os.path.join(
            tempfile.gettempdir(), f"bucketmesh-{region}.{node}"
        )
        self.directory = Path(directory)
        self.snapshot = self.directory / STATE_FILE
        self.client = client if client is not None else _client(target)
        #: the owner item's incarnation read at restore (None: no item)
        self.seen: int | None = None
        #: this life's incarnation, once claimed
        self.mine: int | None = None
        self.fenced: str | None = None
        # local segment seq → bytes already in the table, and the items holding them
        self._sent: dict[int, int] = {}
        self._items: dict[int, list[str]] = {}
        self._snap_ref: str | None = None
        self._snap_chunks = 0
        self._snap_ident: tuple[int, int, int] | None = None
        self._gen = 0
        self._lock = threading.Lock()
        self.checkpoints = 0
        self.failures = 0
        self.last_error: str | None = None

    @classmethod
    def open(cls, uri: str, *, region: str, node: str) -> DynamoState:
        try:
            target = parse_uri(uri)
        except ValueError as error:
            raise DynamoError(f"storage.snapshot {error}") from None
        return cls(target, region=region, node=node)

    # -- start-up ------------------------------------------------------------------

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        """A boto3 call; anything but a failed condition becomes a DynamoError."""
        try:
            return getattr(self.client, method)(TableName=self.target.table, **kwargs)
        except Exception as error:
            if _condition_failed(error):
                raise
            raise DynamoError(
                f"DynamoDB table {self.target.table!r}: {what} failed: {error}"
            ) from None

    def _query(self, prefix: str) -> Iterator[dict[str, Any]]:
        start: dict[str, Any] | None = None
        while True:
            kwargs: dict[str, Any] = {
                "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
                "ExpressionAttributeValues": {
                    ":pk": {"S": self.identity},
                    ":prefix": {"S": prefix},
                },
                "ConsistentRead": True,
            }
            if start is not None:
                kwargs["ExclusiveStartKey"] = start
            page = self._call(f"reading {prefix}* items", "query", **kwargs)
            yield from page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                return

    def restore(self) -> Path:
        """Replace the scratch directory's state files with the table's copy; returns
        the snapshot path the store opens. Raises DynamoError."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # The files are another process's while it holds their lock (memory.py): never
        # wipe those. The store takes the lock again when it opens them, a moment later.
        holder = f"pid {os.getpid()} ({self.identity}, restoring from DynamoDB)"
        try:
            lock = StateLock(self.snapshot, holder)
        except StateLocked as error:
            raise DynamoError(str(error)) from None
        try:
            self._restore_files()
        finally:
            lock.release()
        return self.snapshot

    def _restore_files(self) -> None:
        for stale in self.directory.glob(STATE_FILE + "*"):
            if not stale.name.endswith(".lock"):
                stale.unlink()
        owner = self._call(
            "reading the owner item",
            "get_item",
            Key={"pk": {"S": self.identity}, "sk": {"S": OWNER}},
            ConsistentRead=True,
        ).get("Item")
        if owner is not None:
            self.seen = int(owner["inc"]["N"])
            ref = owner.get("snap", {}).get("S")
            if ref:
                chunks = [item["data"]["B"] for item in self._query(f"snap#{ref}#")]
                expected = int(owner["chunks"]["N"])
                if len(chunks) != expected:
                    raise DynamoError(
                        f"DynamoDB table {self.target.table!r}: snapshot {ref} of "
                        f"{self.identity} has {len(chunks)} of its {expected} chunks"
                    )
                self.snapshot.write_bytes(b"".join(chunks))
                self._snap_ref, self._snap_chunks = ref, expected
                self._snap_ident = self._ident()
        # the segments, each (inc, seq) one local file in the order they were written
        pieces: dict[tuple[str, str], list[tuple[int, bytes, str]]] = {}
        for item in self._query("seg#"):
            _, inc, seq, offset = item["sk"]["S"].split("#")
            pieces.setdefault((inc, seq), []).append(
                (int(offset), item["data"]["B"], item["sk"]["S"])
            )
        local = 0
        for key in sorted(pieces):
            local += 1
            parts = sorted(pieces[key])
            data = b"".join(part for _, part, _ in parts)
            (self.directory / f"{STATE_FILE}.wal.{local}").write_bytes(data)
            self._sent[local] = len(data)
            self._items[local] = [sk for _, _, sk in parts]
        if self.seen is not None:
            # The last claimed incarnation, even if its life checkpointed nothing: the
            # store's next incarnation is above it (wal.py: a segment's first frame
            # names its writer).
            local += 1
            marker = frame(DeltaBatch(f"{self.identity}/{self.seen}", []))
            (self.directory / f"{STATE_FILE}.wal.{local}").write_bytes(marker)
            self._sent[local] = len(marker)
            self._items[local] = []
        log.info(
            "restored %s from DynamoDB table %s: %s, %d log segment(s)",
            self.identity,
            self.target.table,
            f"snapshot {self._snap_ref}" if self._snap_ref else "no snapshot",
            len(pieces),
        )

    def claim(self, replica_id: str) -> None:
        """Record this life's incarnation, on condition that the owner item is what
        ``restore`` read. Raises DynamoError (``Fenced`` when another node won)."""
        mine = _incarnation(replica_id)
        if self.seen is not None and mine <= self.seen:
            raise DynamoError(f"incarnation {mine} is not above the table's {self.seen}")
        values: dict[str, Any] = {":mine": {"N": str(mine)}, ":at": {"N": str(time.time_ns())}}
        if self.seen is None:
            condition = "attribute_not_exists(pk)"
        else:
            condition = "inc = :seen"
            values[":seen"] = {"N": str(self.seen)}
        try:
            self._call(
                "claiming the owner item",
                "update_item",
                Key={"pk": {"S": self.identity}, "sk": {"S": OWNER}},
                UpdateExpression="SET inc = :mine, #at = :at",
                ConditionExpression=condition,
                ExpressionAttributeNames={"#at": "at"},
                ExpressionAttributeValues=values,
            )
        except DynamoError:
            raise
        except Exception:
            raise Fenced(
                f"DynamoDB table {self.target.table!r}: another node with identity "
                f"{self.identity} claimed it since this one read it (the conditional "
                "write was refused); two nodes must not share a region and node name"
            ) from None
        self.mine = mine
        log.info("%s claimed incarnation %d in DynamoDB", self.identity, mine)

    # -- checkpoints ---------------------------------------------------------------

    def install(self, metrics: NodeMetrics) -> None:
        metrics.gauge(
            "bucketmesh_dynamodb_unsaved_bytes",
            "Bytes of this node's write-ahead log not yet in DynamoDB (the durability "
            "window of a node without a volume)",
            lambda: float(self.unsaved_bytes()),
        )
        metrics.counter(
            "bucketmesh_dynamodb_checkpoints",
            "Checkpoint rounds that reached DynamoDB",
            lambda: self.checkpoints,
        )
        metrics.counter(
            "bucketmesh_dynamodb_checkpoint_failures",
            "Checkpoint rounds that failed (retried; fenced nodes fail every round)",
            lambda: self.failures,
        )
        metrics.gauge(
            "bucketmesh_dynamodb_fenced",
            "1 once another node with this identity took the table over",
            lambda: float(self.fenced is not None),
        )

    def unsaved_bytes(self) -> int:
        """The log's bytes not in the table yet, and the snapshot's if it is newer
        than the table's."""
        unsaved = 0
        ident = self._ident()
        if ident is not None and ident != self._snap_ident:
            unsaved += ident[2]
        for seq, path in segments(self.snapshot):
            with contextlib.suppress(FileNotFoundError):
                unsaved += max(0, path.stat().st_size - self._sent.get(seq, 0))
        return unsaved

    async def checkpoint(self) -> None:
        """One round (see the module docstring), in a worker thread."""
        await asyncio.to_thread(self.checkpoint_now)

    def checkpoint_now(self) -> None:
        with self._lock:
            if self.fenced is not None:
                raise Fenced(self.fenced)
            try:
                self._round()
            except Exception as error:
                self.failures += 1
                if _condition_failed(error):
                    self.fenced = (
                        f"another node with identity {self.identity} took the DynamoDB "
                        f"table {self.target.table!r} over (this is incarnation "
                        f"{self.mine}): nothing more is written to it"
                    )
                    log.error("%s", self.fenced)
                    raise Fenced(self.fenced) from None
                self.last_error = str(error)
                if isinstance(error, DynamoError):
                    raise
                raise DynamoError(
                    f"DynamoDB table {self.target.table!r}: checkpoint failed: {error}"
                ) from None
            self.checkpoints += 1

    def _ident(self) -> tuple[int, int, int] | None:
        try:
            st = self.snapshot.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _put(self, sk: str, data: bytes) -> None:
        self.client.put_item(
            TableName=self.target.table,
            Item={"pk": {"S": self.identity}, "sk": {"S": sk}, "data": {"B": data}},
            ConditionExpression="attribute_not_exists(sk)",
        )

    def _delete(self, sk: str) -> None:
        self.client.delete_item(
            TableName=self.target.table, Key={"pk": {"S": self.identity}, "sk": {"S": sk}}
        )

    def _owner_update(self, expression: str, values: dict[str, Any]) -> None:
        assert self.mine is not None
        self.client.update_item(
            TableName=self.target.table,
            Key={"pk": {"S": self.identity}, "sk": {"S": OWNER}},
            UpdateExpression=expression,
            ConditionExpression="inc = :mine",
            ExpressionAttributeNames={"#at": "at"},
            ExpressionAttributeValues={
                ":mine": {"N": str(self.mine)},
                ":at": {"N": str(time.time_ns())},
                **values,
            },
        )

    def _round(self) -> None:
        if self.mine is None:
            raise DynamoError("checkpoint before claim")
        # The segments are listed before the snapshot is read: a segment missing from
        # the list was retired by a snapshot committed before it, so the one read
        # below (or one uploaded already) covers it (wal.py, rotation).
        listed = segments(self.snapshot)
        for seq, path in listed:
            sent = self._sent.get(seq, 0)
            try:
                with path.open("rb") as stream:
                    stream.seek(sent)
                    data = stream.read()
            except FileNotFoundError:
                continue
            for start in range(0, len(data), CHUNK_BYTES):
                offset = sent + start
                sk = f"seg#{self.mine:020d}#{seq:010d}#{offset:012d}"
                self._put(sk, data[start : start + CHUNK_BYTES])
                self._items.setdefault(seq, []).append(sk)
                self._sent[seq] = offset + len(data[start : start + CHUNK_BYTES])
        snapshot_current = True
        with contextlib.suppress(FileNotFoundError), self.snapshot.open("rb") as stream:
            st = os.fstat(stream.fileno())
            ident = (st.st_ino, st.st_mtime_ns, st.st_size)
            if ident != self._snap_ident:
                snapshot_current = False
                data = stream.read()
        if not snapshot_current:
            self._gen += 1
            ref = f"{self.mine:020d}#{self._gen:010d}"
            chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
            for index, chunk in enumerate(chunks):
                self._put(f"snap#{ref}#{index:06d}", chunk)
            self._owner_update(
                "SET snap = :ref, chunks = :n, #at = :at",
                {":ref": {"S": ref}, ":n": {"N": str(len(chunks))}},
            )
            old_ref, old_chunks = self._snap_ref, self._snap_chunks
            self._snap_ref, self._snap_chunks, self._snap_ident = ref, len(chunks), ident
            if old_ref is not None:
                for index in range(old_chunks):
                    self._delete(f"snap#{old_ref}#{index:06d}")
        else:
            self._owner_update("SET #at = :at", {})  # still ours? (fencing)
        if self._snap_ident is None:
            return  # no snapshot yet: every segment is still needed
        present = {seq for seq, _ in listed}
        for seq in [seq for seq in self._items if seq not in present]:
            for sk in self._items.pop(seq):
                self._delete(sk)
            self._sent.pop(seq, None)

    def readiness(self) -> str:
        return "ok" if self.fenced is None else f"fenced: {self.fenced}"


__all__ = [
    "CHUNK_BYTES",
    "DynamoError",
    "DynamoState",
    "Fenced",
    "Target",
    "create_table",
    "is_uri",
    "parse_uri",
]

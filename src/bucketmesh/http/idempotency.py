"""``Idempotency-Key``: a retried request gets its first answer back instead of being
decided (and charged) again. Answers are kept per key *and* per caller and request
(path, client address, body, query, the headers keys are built from), so the same key
sent by someone else, or with another body, is a different request."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from bucketmesh.http.errors import bad_request
from bucketmesh.http.server import Request, Response

IDEMPOTENCY_TTL_S = 600.0
IDEMPOTENCY_MAX = 100_000
MAX_IDEMPOTENCY_KEY = 256

CacheKey = tuple[str, str]


def replayed(response: Response) -> Response:
    """The copy of a first decision that an Idempotency-Key retry gets back."""
    headers = [*(response.headers or ()), ("Idempotent-Replayed", "true")]
    return Response(response.status, response.body, response.content_type, headers)


def idempotency_key(request: Request, scope_headers: Iterable[str]) -> CacheKey | None:
    """The cache key of a request carrying ``Idempotency-Key`` (None without one)."""
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not value or len(value) > MAX_IDEMPOTENCY_KEY:
        raise bad_request(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", "Idempotency-Key"
        )
    headers = request.headers
    scope = "\x00".join(
        [request.client_ip, request.body.decode("latin-1"), repr(sorted(request.query.items()))]
        + [headers.get(name, "") for name in scope_headers]
    )
    return (request.path, value + "\x00" + scope)


class IdempotencyCache:
    """First decisions by Idempotency-Key: bounded in size, each kept for a while."""

    def __init__(self, ttl_s: float = IDEMPOTENCY_TTL_S, max_entries: int = IDEMPOTENCY_MAX):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.entries: OrderedDict[CacheKey, tuple[float, Response]] = OrderedDict()

    def get(self, key: CacheKey, now: float) -> Response | None:
        found = self.entries.get(key)
        if found is None:
            return None
        if found[0] < now:
            del self.entries[key]
            return None
        return found[1]

    def put(self, key: CacheKey, response: Response, now: float) -> None:
        entries = self.entries
        entries[key] = (now + self.ttl_s, response)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        # expire from the old end while it is stale, so idle memory drains
        while entries:
            oldest = next(iter(entries.values()))
            if oldest[0] >= now:
                break
            entries.popitem(last=False)

    def forget(self, key: CacheKey) -> None:
        self.entries.pop(key, None)

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()

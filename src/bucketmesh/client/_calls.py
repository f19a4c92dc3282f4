"""What ``Client`` and ``AsyncClient`` share: the endpoints a client is given, the
requests of each call, and reading the answers. No I/O here either: the two
clients differ only in how they send and sleep.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Final, Literal
from urllib.parse import quote, urlsplit

import httpx
import msgspec

from bucketmesh.client.errors import ApiError, Unavailable, api_error
from bucketmesh.client.results import (
    BatchResult,
    BucketState,
    Decision,
    RuleConfig,
    Status,
    fallback_decision,
)
from bucketmesh.client.retry import (
    BreakerPolicy,
    ClientStats,
    Endpoint,
    Endpoints,
    Failed,
    Replied,
    RetryPolicy,
    retry_after_seconds,
)
from bucketmesh.core.affinity import Ring
from bucketmesh.core.decisions import BUCKET_CAP_PROBLEM

#: Where a client goes when given no URL and ``BUCKETMESH_URL`` is unset.
DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "BUCKETMESH_URL"
TOKEN_ENV = "BUCKETMESH_ADMIN_TOKEN"


def _version() -> str:
    # from the installed distribution: importing the ``bucketmesh`` package's own
    # ``__version__`` would make the client import what the package root imports
    try:
        return metadata.version("bucketmesh")
    except metadata.PackageNotFoundError:
        return "0"


USER_AGENT = f"bucketmesh-python/{_version()}"
#: The most items the server takes in one ``POST /v1/rate/batch``.
MAX_BATCH = 1000

OnUnavailable = Literal["raise", "open", "closed"]
UrlSpec = str | Sequence[str] | Mapping[str, str] | None
#: ``nodes=``: region → its nodes' URLs, a mapping node name → URL, or a list (the
#: i-th URL of every region is ring member ``i``) — see ``node_rings``.
NodesSpec = Mapping[str, Sequence[str] | Mapping[str, str]] | None
KeyOrHeaders = str | Mapping[str, str]


# -- endpoints ----------------------------------------------------------------------------


def _checked_url(url: str, where: str) -> str:
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"{where}: bad URL {url!r}: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: expected http(s)://host[:port], got {url!r}")
    del port
    return url.strip().rstrip("/")


def _default_name(url: str) -> str:
    return urlsplit(url).netloc


def named_urls(spec: UrlSpec, environ: Mapping[str, str] = os.environ) -> list[tuple[str, str]]:
    """(name, URL) pairs in preference order, from what the caller gave: one URL, a list
    of them, or a mapping region → URL; with none, ``$BUCKETMESH_URL`` (a comma-separated
    list of ``URL`` or ``region=URL``), else ``http://127.0.0.1:8080``."""
    if spec is None:
        text = environ.get(URL_ENV, "").strip()
        if not text:
            return [(_default_name(DEFAULT_URL), DEFAULT_URL)]
        found: list[tuple[str, str]] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, url = part.partition("=")
            if not sep or "://" in name:  # a bare URL
                name, url = "", part
            url = _checked_url(url, URL_ENV)
            found.append((name.strip() or _default_name(url), url))
        return found
    if isinstance(spec, str):
        url = _checked_url(spec, "url")
        return [(_default_name(url), url)]
    if isinstance(spec, Mapping):
        found = [(str(name), _checked_url(url, f"url[{name!r}]")) for name, url in spec.items()]
    else:
        found = [(_default_name(u), _checked_url(u, f"url[{i}]")) for i, u in enumerate(spec)]
    if not found:
        raise ValueError("url: at least one endpoint URL is needed")
    return found


# -- configuration shared by both clients ---------------------------------------------------


def node_rings(nodes: NodesSpec, regions: Sequence[str]) -> dict[str, tuple[Ring, dict[str, str]]]:
    """Key affinity (docs/scale.md): for each region given in ``nodes``, a MurmurHash3
    ring over its node names (``core/affinity.py``) and each node's URL. Node names
    are the mapping's keys, or positions (``"0"``, ``"1"``, ...) for a list, so
    regions that name (or list) their nodes alike route a key to the same node name
    in every region."""
    if nodes is None:
        return {}
    if not isinstance(nodes, Mapping):
        raise TypeError(f"nodes must map a region to its nodes' URLs, got {nodes!r}")
    rings: dict[str, tuple[Ring, dict[str, str]]] = {}
    for region, spec in nodes.items():
        if region not in regions:
            raise ValueError(
                f"nodes[{region!r}]: not a region of url= (regions: {', '.join(regions)})"
            )
        if isinstance(spec, str) or not isinstance(spec, (Mapping, Sequence)):
            raise TypeError(f"nodes[{region!r}] must be a list or mapping of URLs, got {spec!r}")
        named = spec.items() if isinstance(spec, Mapping) else enumerate(spec)
        urls = {str(name): _checked_url(url, f"nodes[{region!r}][{name!r}]") for name, url in named}
        if not urls:
            raise ValueError(f"nodes[{region!r}]: at least one node URL is needed")
        rings[region] = (Ring(urls), urls)
    return rings


@dataclass
class Settings:
    endpoints: Endpoints
    timeout: float
    retry: RetryPolicy
    on_unavailable: OnUnavailable
    headers: dict[str, str]
    clock: Callable[[], float]
    rng: random.Random
    stats: ClientStats
    #: region name → (its nodes' ring, node name → URL): see ``node_rings``
    rings: dict[str, tuple[Ring, dict[str, str]]] = field(default_factory=dict)

    def url_for(self, call: Call, endpoint: Endpoint) -> str:
        """Where ``call`` goes in ``endpoint``'s region: the key's owner node when the
        call names one bucket key and the region's nodes are known, else the region."""
        found = self.rings.get(endpoint.name) if call.route_key is not None else None
        if found is None or call.route_key is None:
            return call.url(endpoint)
        ring, urls = found
        return urls[ring.owner(call.route_key)] + call.path


def settings(
    url: UrlSpec,
    *,
    timeout: float,
    retry: RetryPolicy | None,
    breaker: BreakerPolicy | None,
    on_unavailable: OnUnavailable,
    admin_token: str | None,
    headers: Mapping[str, str] | None,
    clock: Callable[[], float] | None,
    rng: random.Random | None,
    nodes: NodesSpec = None,
) -> Settings:
    if on_unavailable not in ("raise", "open", "closed"):
        raise ValueError(
            f"on_unavailable must be 'raise', 'open' or 'closed', got {on_unavailable!r}"
        )
    if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    all_headers = {"User-Agent": USER_AGENT}
    token = admin_token if admin_token is not None else os.environ.get(TOKEN_ENV) or None
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    endpoints = Endpoints(named_urls(url), breaker or BreakerPolicy())
    return Settings(
        endpoints=endpoints,
        timeout=float(timeout),
        retry=retry or RetryPolicy(),
        on_unavailable=on_unavailable,
        headers=all_headers,
        clock=clock or time.monotonic,
        rng=rng or random.Random(),
        stats=ClientStats(),
        rings=node_rings(nodes, [endpoint.name for endpoint in endpoints]),
    )


def pool_limits(max_connections: int) -> httpx.Limits:
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=4.0,  # under the node's 5 s keep-alive: reuse, never race its close
    )


# -- requests -----------------------------------------------------------------------------


def new_idempotency_key() -> str:
    return "bm-" + uuid.uuid4().hex


class Item(msgspec.Struct, omit_defaults=True):
    key: str | None = None
    rule: str | None = None
    tokens: int = 1


class _Batch(msgspec.Struct):
    requests: list[Item]
    atomic: bool


encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Call:
    """One logical call's HTTP request: every attempt sends exactly these bytes."""

    method: str
    path: str
    params: dict[str, str] | None = None
    content: bytes | None = None
    headers: dict[str, str | bytes] | None = None
    #: the one bucket key the call decides, for key affinity (``Settings.url_for``)
    route_key: str | None = None

    def url(self, endpoint: Endpoint) -> str:
        return endpoint.url + self.path

    def http_headers(self) -> list[tuple[bytes, bytes]] | None:
        """The headers as bytes (a value that is not ASCII is already its UTF-8)."""
        if self.headers is None:
            return None
        return [
            (name.encode(), value if isinstance(value, bytes) else value.encode())
            for name, value in self.headers.items()
        ]


# an HTTP field name (RFC 9110 token); a value holds no control character but tab
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def checked_text(value: str, what: str) -> str:
    """``value`` if it is text that UTF-8 can carry; a ValueError naming ``what`` when it
    holds a lone surrogate (bytes that were not UTF-8, decoded with surrogateescape, as
    a command line or a file read with errors="surrogateescape" gives them)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text, got {value!r}") from None
    return value


def _header_value(name: str, value: object, what: str) -> str | bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} {name!r} must be a str, got {value!r}")
    if _CONTROL.search(value):
        raise ValueError(
            f"{what} {name!r} holds a control character (a line break read with a key "
            f"from a file?), got {value!r}"
        )
    checked_text(value, f"{what} {name!r}")
    # the nodes read header values as UTF-8: send text that is not ASCII as its bytes
    return value if value.isascii() else value.encode()


def checked_headers(headers: Mapping[str, str], what: str = "header") -> dict[str, str | bytes]:
    """Request headers for the nodes' rules, checked here: a name that is no HTTP
    token or a value HTTP cannot carry is the caller's error (ValueError naming it),
    raised before anything is sent; sent, it failed as if the node were down, the
    client retried it and opened its circuit for every caller."""
    checked: dict[str, str | bytes] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{what} name {name!r} is not a valid HTTP header name")
        checked[name] = _header_value(name, value, what)
    return checked


def _json_headers(
    idempotency_key: str | None, extra: Mapping[str, str] | None = None
) -> dict[str, str | bytes]:
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = _header_value("Idempotency-Key", idempotency_key, "header")
    if extra:
        headers.update(checked_headers(extra))
    return headers


def checked_limit(name: str, value: float | None) -> float | None:
    """A limit for ``configure``: None (unchanged) or a finite number. NaN and the
    infinities have no JSON form (they were sent as null: that field silently
    unchanged)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def checked_tokens(tokens: int) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise TypeError(f"tokens must be an integer, got {tokens!r}")
    return tokens


def rate_call(key: KeyOrHeaders, tokens: int, rule: str | None, idempotency_key: str) -> Call:
    """``POST /v1/rate``: a bucket key (with the rule whose limits apply), or the
    request headers the node's rules render the key from (with the rule that renders
    it; by default the first whose template the headers satisfy)."""
    tokens = checked_tokens(tokens)
    if isinstance(key, str):
        body = encode(Item(key=checked_text(key, "key"), rule=rule, tokens=tokens))
        return Call(
            "POST",
            "/v1/rate",
            content=body,
            headers=_json_headers(idempotency_key),
            route_key=key,
        )
    if not isinstance(key, Mapping):
        raise TypeError(f"rate() takes a bucket key (str) or request headers, got {key!r}")
    # with headers, ``rule`` names the rule whose template renders the key from them
    body = encode(Item(rule=rule, tokens=tokens))
    return Call("POST", "/v1/rate", content=body, headers=_json_headers(idempotency_key, key))


BatchItem = str | tuple[str, int] | tuple[str, int, str | None] | Mapping[str, Any]


def batch_items(items: Iterable[BatchItem]) -> list[Item]:
    """Batch items from keys, ``(key, tokens)``, ``(key, tokens, rule)`` or mappings."""
    found: list[Item] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            found.append(Item(key=item))
        elif isinstance(item, tuple) and 2 <= len(item) <= 3:
            rule = item[2] if len(item) == 3 else None
            found.append(Item(key=item[0], tokens=checked_tokens(item[1]), rule=rule))
        elif isinstance(item, Mapping):
            unknown = set(item) - {"key", "rule", "tokens"}
            if unknown:
                raise TypeError(f"items[{index}]: unknown fields {sorted(unknown)}")
            found.append(
                Item(
                    key=item.get("key"),
                    rule=item.get("rule"),
                    tokens=checked_tokens(item.get("tokens", 1)),
                )
            )
        else:
            raise TypeError(
                f"items[{index}]: expected a key, (key, tokens[, rule]) or a mapping, got {item!r}"
            )
    if not found:
        raise ValueError("a batch needs at least one item (the API refuses an empty one)")
    return found


def batch_call(items: list[Item], atomic: bool, idempotency_key: str) -> Call:
    body = encode(_Batch(items, bool(atomic)))
    return Call("POST", "/v1/rate/batch", content=body, headers=_json_headers(idempotency_key))


def state_call(key: str, rule: str | None) -> Call:
    params = {"key": checked_text(key, "key")}
    if rule is not None:
        params["rule"] = rule
    return Call("GET", "/v1/bucket/state", params=params)


def status_call(key: str | None) -> Call:
    return Call("GET", "/v1/status", params={"key": key} if key is not None else None)


def configure_call(
    key_or_rule: str,
    capacity: int | None,
    refill_rate: float | None,
    ttl: float | None,
    mode: str | None,
) -> Call:
    fields: dict[str, Any] = {
        name: value
        for name, value in (
            ("capacity", checked_limit("capacity", capacity)),
            ("refillRate", checked_limit("refill_rate", refill_rate)),
            ("ttl", checked_limit("ttl", ttl)),
            ("mode", mode),
        )
        if value is not None
    }
    return Call(
        "PATCH",
        "/v1/buckets/" + quote(checked_text(key_or_rule, "key_or_rule"), safe=""),
        content=encode(fields),
        headers=_json_headers(None),
    )


# -- answers ------------------------------------------------------------------------------


def outcome_of(response: httpx.Response) -> Replied:
    status = response.status_code
    return Replied(
        status,
        retry_after_seconds(response.headers.get("retry-after")),
        response,
        final=status == 503 and _problem_type(response) == BUCKET_CAP_PROBLEM,
    )


def _problem_type(response: httpx.Response) -> str | None:
    """A problem+json answer's ``type`` (None for anything else)."""
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        return None
    kind = body.get("type") if isinstance(body, dict) else None
    return kind if isinstance(kind, str) else None


def failure_of(error: httpx.TransportError) -> Failed:
    """Whether the request may have reached the node: not when no connection was made."""
    not_sent = isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
    return Failed(sent=not not_sent, reason=f"{type(error).__name__}: {error}".rstrip(": "))


def _problem(response: httpx.Response, endpoint: Endpoint) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": response.text[:200] or f"HTTP {response.status_code}"}
    return api_error(response.status_code, body, endpoint.url)


_decision = msgspec.json.Decoder(Decision)
_batch = msgspec.json.Decoder(BatchResult)
_state = msgspec.json.Decoder(BucketState)
_status = msgspec.json.Decoder(Status)
_config = msgspec.json.Decoder(RuleConfig)


def _decode(
    decoder: msgspec.json.Decoder[Any], response: httpx.Response, endpoint: Endpoint
) -> Any:
    try:
        return decoder.decode(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise ApiError(
            response.status_code,
            f"unexpected answer from {endpoint.url}: {error}",
            endpoint=endpoint.url,
        ) from None


def _replayed(response: httpx.Response) -> bool:
    return bool(response.headers.get("idempotent-replayed") == "true")


def decision_of(response: httpx.Response, endpoint: Endpoint, attempts: int) -> Decision:
    """A ``POST /v1/rate`` answer: 200 and 429 are decisions, anything else an error."""
    if response.status_code not in (200, 429):
        raise _problem(response, endpoint)
    decision: Decision = _decode(_decision, response, endpoint)
    decision.endpoint = endpoint.url
    decision.attempts = attempts
    decision.replayed = _replayed(response)
    return decision


def batch_of(response: httpx.Response, endpoint: Endpoint, attempts: int) -> BatchResult:
    if response.status_code != 200:
        raise _problem(response, endpoint)
    result: BatchResult = _decode(_batch, response, endpoint)
    replayed = _replayed(response)
    result.endpoint, result.attempts, result.replayed = endpoint.url, attempts, replayed
    for decision in result.results:
        decision.endpoint, decision.attempts, decision.replayed = endpoint.url, attempts, replayed
    return result


def state_of(response: httpx.Response, endpoint: Endpoint) -> BucketState:
    if response.status_code != 200:
        raise _problem(response, endpoint)
    state: BucketState = _decode(_state, response, endpoint)
    state.endpoint = endpoint.url
    return state


def status_of(response: httpx.Response, endpoint: Endpoint) -> Status:
    if response.status_code != 200:
        raise _problem(response, endpoint)
    status: Status = _decode(_status, response, endpoint)
    status.endpoint = endpoint.url
    return status


def config_of(response: httpx.Response, endpoint: Endpoint) -> RuleConfig:
    if response.status_code != 200:
        raise _problem(response, endpoint)
    config: RuleConfig = _decode(_config, response, endpoint)
    config.endpoint = endpoint.url
    return config


# -- no region answered --------------------------------------------------------------------


def fallback(
    settings: Settings,
    error: Unavailable,
    key: KeyOrHeaders,
    rule: str | None,
    attempts: int,
    waited: float = 0.0,
) -> Decision:
    """The configured answer when no region answered: raise, or decide open / closed."""
    mode = settings.on_unavailable
    if mode == "raise":
        raise error
    stats = settings.stats
    if mode == "open":
        stats.failed_open += 1
    else:
        stats.failed_closed += 1
    return fallback_decision(key if isinstance(key, str) else "", rule, mode, attempts, waited)


def batch_fallback(
    settings: Settings, error: Unavailable, items: list[Item], attempts: int
) -> BatchResult:
    mode = settings.on_unavailable
    if mode == "raise":
        raise error
    results = [fallback(settings, error, i.key or "", i.rule, attempts) for i in items]
    allowed = len(results) if mode == "open" else 0
    return BatchResult(
        results=results,
        allowed=allowed,
        denied=len(results) - allowed,
        attempts=attempts,
        fallback=mode,
    )


def bad_item_index(error: ApiError, count: int) -> int | None:
    """The item a batch's refusal names (``requests[3].tokens`` → 3: a 400, or a new key
    at the bucket cap), if it names one."""
    field = error.field or ""
    if not field.startswith("requests["):
        return None
    index_text, sep, _ = field[len("requests[") :].partition("]")
    if not sep or not index_text.isdigit():
        return None
    index = int(index_text)
    return index if index < count else None


def item_error(error: ApiError, index: int) -> ApiError:
    """A batch's refusal of item ``index`` as that item's own ``rate()`` gets it."""
    _, _, rest = (error.field or "").partition("].")
    return type(error)(
        error.status,
        error.detail,
        field=rest or None,
        type=error.type,
        title=error.title,
        endpoint=error.endpoint,
        body=error.body,
    )


def wait_budget(settings: Settings, timeout: float | None) -> float:
    """How long ``wait=True`` keeps trying after 429s: ``timeout``, else the retry budget."""
    if timeout is None:
        return settings.retry.total_timeout
    if not (isinstance(timeout, (int, float)) and timeout >= 0):
        raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    return float(timeout)


__all__ = [
    "DEFAULT_URL",
    "MAX_BATCH",
    "Call",
    "KeyOrHeaders",
    "NodesSpec",
    "OnUnavailable",
    "Settings",
    "UrlSpec",
]

"""The bucketmesh.yaml file: its typed settings, how they are loaded and overridden.

This module owns the configuration schema (msgspec structs, camelCase in the file,
snake_case in code), ``${VAR}`` substitution, the rule list (inline or in a separate
buckets.yaml), overrides from flags and ``BUCKETMESH_*`` variables, and the wording
of every config error, each of which names the file, the field and the value.
It reads files and the environment it is handed, and nothing else.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import time
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import msgspec
import yaml
from msgspec import Meta

from bucketmesh.core.bucket import SHARED, STRICT
from bucketmesh.core.limiter import Limiter
from bucketmesh.core.limits import ErrorLocation, LimitError, check_limits, error_location
from bucketmesh.core.rules import (
    DEFAULT_TTL,
    KeyTemplate,
    Rule,
    RuleError,
    StoreFailurePolicy,
    parse_rate,
)
from bucketmesh.storage import REDIS_CALLS_IN_FLIGHT
from bucketmesh.storage.wal import Durability

__all__ = [
    "ENV_OVERRIDES",
    "AdminConfig",
    "AuditConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "StorageConfig",
    "SyncConfig",
    "TlsConfig",
    "apply_overrides",
    "env_overrides",
    "load_buckets",
    "load_config",
    "parse_config",
    "parse_listen",
]


class ConfigError(Exception):
    """A configuration problem, naming where it is and what is wrong.

    ``file`` is the path as the user gave it (or the flag / environment variable
    an override came from), ``field`` the dotted field in the file's spelling
    (``sync.syncClusterId``; within a rule just ``refillRate``), ``rule`` the
    1-based rule number, ``line`` the YAML line for syntax errors.
    """

    def __init__(
        self,
        file: str,
        field: str,
        message: str,
        *,
        rule: int | None = None,
        rule_name: str | None = None,
        line: int | None = None,
    ) -> None:
        self.file = file
        self.field = field
        self.message = message
        self.rule = rule
        self.rule_name = rule_name
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [self.file]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.rule is not None:
            where.append(f"rule {self.rule}" + (f" ({self.rule_name})" if self.rule_name else ""))
        if not self.field:
            detail = self.message
        elif self.message.startswith(_PREDICATES):
            detail = f"{self.field} {self.message}"
        else:
            detail = f"{self.field}: {self.message}"
        return ": ".join([*where, detail])


# Messages that read as a predicate of the field ("refillRate must be > 0") follow
# it with a space; the others ("syncClusterId: expected a string") with a colon.
_PREDICATES: Final = ("must ", "is ", "cannot ", "needs ", "has ", "lists ")


class _Problem(Exception):
    """A problem at ``field``; turned into a ConfigError where the file is known."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# -- the schema -------------------------------------------------------------

_FILE_NAMES: Final[Mapping[str, str]] = {
    "interval_ms": "interval",
    "shed_lag_ms": "shedLag",
    "header_timeout_ms": "headerTimeout",
    "body_timeout_ms": "bodyTimeout",
    "keepalive_timeout_ms": "keepaliveTimeout",
    "max_connection_age_ms": "maxConnectionAge",
    "peer_timeout_ms": "peerTimeout",
    "unrecovered_wait_ms": "unrecoveredWait",
    "forward_timeout_ms": "forwardTimeout",
    "snapshot_interval_ms": "snapshotInterval",
    "refill_rate_alias": "refill_rate",
    "on_store_failure_alias": "on_store_failure",
}


def _file_name(name: str) -> str:
    """The file's spelling of a field: camelCase, with a few fields named differently."""
    if name in _FILE_NAMES:
        return _FILE_NAMES[name]
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


_Count = Annotated[int, Meta(ge=1)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename=_file_name):
    """A part of the file: immutable, camelCase in YAML, no field it does not know."""


def _repr_hiding(struct: msgspec.Struct, secret: str) -> str:
    """The usual repr with the ``secret`` field masked, so logging a config leaks nothing."""
    shown = []
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        shown.append(f"{name}={'***' if name == secret and value else repr(value)}")
    return f"{type(struct).__name__}({', '.join(shown)})"


class DiscoveryConfig(_Section, frozen=True):
    """``sync.discovery``: this region's other nodes from the DNS of a Kubernetes
    headless Service (replication/discovery.py): the SRV records
    ``_<portName>._tcp.<dns>`` name each pod (``<pod>.<service>...``, a slot
    ``<region>.<pod>``) and its port, its A record the address; re-resolved every
    ``interval`` ms. ``resolver`` (``host:port``) asks that DNS server instead of the
    system's (/etc/resolv.conf)."""

    dns: str
    port_name: str = "http"
    interval_ms: _Count = 5000
    resolver: str | None = None
    scheme: Literal["http", "https"] = "http"


class SyncConfig(_Section, frozen=True):
    """The mesh: which regions exist, how to reach them, how often to send deltas.

    ``peers`` lists region names (this node's own region may be among them);
    ``peer_urls`` holds explicit URLs and ``peer_url_template`` (``peerUrls`` given
    as one string, e.g. ``http://bucketmesh-{region}:8080``) covers the rest.
    """

    enabled: bool = False
    sync_cluster_id: str = "bucketmesh"
    peers: tuple[str, ...] = ()
    peer_urls: dict[str, str] = msgspec.field(default_factory=dict)
    peer_url_template: str | None = None
    # One secret, or a list for rotation: sign with the first, accept any (docs/security.md).
    secret: str | tuple[str, ...] | None = None
    # A file holding the secret, one per line (a mounted Kubernetes Secret); read when
    # secret is not given, and again whenever it changes.
    secret_file: str | None = None
    interval_ms: _Count = 20
    peer_timeout_ms: _Count = 1000
    # a node without a snapshot whose start-up pull reaches no peer: shared buckets it
    # creates refill from zero at its start (refill), or start full (full); docs/sync.md
    unrecovered_start: Literal["refill", "full"] = "refill"
    # how long such a node waits at start for a silent peer to answer its pull (a
    # partition, or a peer slow to answer; one that refuses is not waited for)
    unrecovered_wait_ms: _Count = 10_000
    # this region's other nodes from a headless Service's DNS (docs/scale.md)
    discovery: DiscoveryConfig | None = None

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions listed in ``peers`` (see ``Config.regions`` for the whole mesh)."""
        return self.peers

    def url_for(self, region: str) -> str | None:
        """How to reach ``region``: its explicit URL, else the template's, else None."""
        url = self.peer_urls.get(region)
        if url is None and self.peer_url_template is not None:
            url = self.peer_url_template.replace("{region}", region)
        return url

    def __repr__(self) -> str:
        return _repr_hiding(self, "secret")


class StorageConfig(_Section, frozen=True):
    """Where bucket state lives: memory (optionally snapshotted to a file) or Redis."""

    backend: Literal["memory", "redis"] = "memory"
    snapshot: str | None = None
    redis_url: str = "redis://localhost:6379/0"
    # relaxed: the write-ahead log survives kill -9; strict: also power loss (docs/storage.md)
    durability: Durability = "relaxed"
    snapshot_interval_ms: _Count = 5000
    # How long a decision waits on Redis before the rule's onStoreFailure decides.
    redis_timeout_ms: _Count = 100
    # At most this many decision script calls in flight per node (fewer, fuller calls
    # cost Redis and the node less per decision; docs/storage-redis.md, "Batching").
    redis_calls_in_flight: _Count = REDIS_CALLS_IN_FLIGHT


class AdminConfig(_Section, frozen=True):
    """The bearer token PATCH requires; None (or empty in the file) means no token.
    A list is accepted for rotation (any of them is accepted); ``token_file`` holds
    them one per line and is read again whenever it changes."""

    token: str | tuple[str, ...] | None = None
    token_file: str | None = None

    @property
    def tokens(self) -> tuple[str, ...]:
        return _as_tuple(self.token)

    def __repr__(self) -> str:
        return _repr_hiding(self, "token")


ClientAuth = Literal["none", "sync", "all"]


class TlsConfig(_Section, frozen=True):
    """TLS for the listener (API and sync) and for the sync client (http/tls.py).

    ``cert_file``/``key_file``: this node's certificate chain and key (PEM), served
    and presented to peers; ``ca_file``: the CA peers are verified against;
    ``client_auth``: none, sync (the sync endpoints need a client certificate the
    CA signed) or all (every connection needs one); ``pin_regions``: a sync client's
    certificate must also name a region of the mesh."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    client_auth: ClientAuth = "none"
    pin_regions: bool = False
    # ms: the sync client replaces a TLS connection this old (renewed certificates apply)
    max_connection_age_ms: _Count = 30000

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None or self.ca_file is not None


def _as_tuple(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class LimitsConfig(_Section, frozen=True):
    """Resource caps: live buckets per node and request sizes in bytes."""

    max_buckets: _Count = 1_000_000
    max_body_bytes: _Count = 65536
    max_header_bytes: _Count = 16384
    # overload shedding (http/server.py): awaited answers in flight, and the event
    # loop lag in ms beyond which requests get 503 + Retry-After
    max_in_flight: _Count = 4096
    shed_lag_ms: _Count = 50
    # connection timeouts in ms (http/server.py ServerLimits): a request head, a body
    # (and a full write buffer's drain), an idle keep-alive connection
    header_timeout_ms: _Count = 10_000
    body_timeout_ms: _Count = 30_000
    keepalive_timeout_ms: _Count = 5_000


class AffinityConfig(_Section, frozen=True):
    """``affinity``: what a node of a region of several does with a key another node
    of its region owns on the MurmurHash3 ring (core/affinity.py, api/forward.py):
    decide it (``forward: false``, the default) or forward it to the owner, deciding
    it here if the owner does not answer within ``forward_timeout`` ms."""

    forward: bool = False
    forward_timeout_ms: _Count = 200


class AuditConfig(_Section, frozen=True):
    """The audit trail (telemetry/audit.py; docs/operations.md, "Audit trail").

    ``path``: the file (rotated at ``max_bytes`` into ``.1`` … ``.<backups>``) or
    ``-`` for stdout; ``sample``: the share of decisions written (by request id;
    PATCH and fault injection are always written); ``hash_keys``: write a key's
    SHA-256 instead of the key; ``buffer``: events held for the writer thread
    (beyond it an event is dropped and counted, a decision never waits)."""

    enabled: bool = False
    path: str = "-"
    sample: float = 1.0
    hash_keys: bool = False
    buffer: _Count = 10_000
    max_bytes: _Count = 64 * 1024 * 1024
    backups: Annotated[int, Meta(ge=0)] = 5


class _Settings(_Section, frozen=True):
    """Every setting of the file except the rules."""

    region: str = "local"
    node: str = "node-a"
    listen: str = "127.0.0.1:8080"
    envoy_listen: str | None = None
    # the reserved listener: sync, admin, status, metrics and probes only, never shed
    admin_listen: str | None = None
    # The bucket a GET /v1/bucket/state without ?key= reads: a key template, rendered
    # from that request like a rule's (literal text is one fixed key).
    default_state_key: str | None = None
    sync: SyncConfig = msgspec.field(default_factory=SyncConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    affinity: AffinityConfig = msgspec.field(default_factory=AffinityConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    # a grant that leaves less than this share of the capacity counts as near_limit
    near_limit: float = 0.2


class Config(_Settings, frozen=True):
    """A loaded, validated configuration.

    ``listen`` is ``host:port`` (``listen_host`` / ``listen_port`` split it);
    ``envoy_listen`` is where the Envoy RateLimitService gRPC endpoint listens
    (off when None). ``buckets`` are the rules in order; ``path`` is the file
    loaded and ``buckets_path`` the separate buckets file, if any.
    """

    buckets: tuple[Rule, ...] = ()
    path: str | None = None
    buckets_path: str | None = None

    @property
    def listen_host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_listen(self.listen)[1]

    @property
    def regions(self) -> tuple[str, ...]:
        """Every region of the mesh, this one first; just this one when sync is off."""
        if not self.sync.enabled:
            return (self.region,)
        return tuple(dict.fromkeys((self.region, *self.sync.peers)))

    @property
    def remote_peers(self) -> dict[str, str]:
        """Region → URL for every other region this node sends deltas to."""
        if not self.sync.enabled:
            return {}
        peers: dict[str, str] = {}
        for region in self.sync.peers:
            url = self.sync.url_for(region)
            if region != self.region and url is not None:
                peers[region] = url
        return peers


class _BucketEntry(_Section, frozen=True):
    """One entry of ``buckets:`` as written: types only; the limits' ranges and the
    modes are checked by ``core.limits.check_limits``, as everywhere else."""

    key: str
    name: str | None = None
    capacity: int | None = None
    refill_rate: float | None = None
    refill_rate_alias: float | None = None
    rate: str | None = None
    ttl: float = DEFAULT_TTL
    mode: str = SHARED
    on_store_failure: StoreFailurePolicy = "local"
    on_store_failure_alias: StoreFailurePolicy | None = None
    shadow: bool = False


# -- loading ----------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    complete: bool = True,
) -> Config:
    """Load and validate a bucketmesh.yaml; raise ConfigError naming file and field.

    ``${VAR}`` and ``${VAR:-default}`` in string values are replaced from
    ``environ`` (default ``os.environ``); ``$${`` is a literal ``${``. A
    ``buckets:`` path is relative to the config file's directory. With
    ``complete=False`` what an enabled mesh still needs (its secret, peer URLs)
    is left for ``apply_overrides`` to complete: the environment beats the file.
    """
    file = os.fspath(path)
    config = parse_config(
        _read(file),
        file=file,
        environ=environ,
        base_dir=os.path.dirname(file),
        complete=complete,
    )
    return msgspec.structs.replace(config, path=file)


def parse_config(
    text: str,
    *,
    file: str = "<config>",
    environ: Mapping[str, str] | None = None,
    base_dir: str | None = None,
    complete: bool = True,
) -> Config:
    """Validate the YAML ``text`` of a config file; ``file`` names it in errors."""
    env = os.environ if environ is None else environ
    document = _parse_yaml(text, file)
    if document is None:
        document = {}
    if _is_config_map(document):
        raise ConfigError(
            file,
            "kind",
            "is ConfigMap: a Kubernetes manifest is not a bucketmesh.yaml; give its file "
            f'as buckets: (the rules are read from data."{CONFIG_MAP_BUCKETS}")',
        )
    if not isinstance(document, dict):
        raise ConfigError(file, "", f"expected a mapping of settings, got {_show(document)}")
    try:
        settings = _settings_from_document(
            _substituted({k: v for k, v in document.items() if k != "buckets"}, "", env)
        )
        if complete:
            settings = _completed(settings)
    except _Problem as problem:
        raise ConfigError(file, problem.field, problem.message) from None

    buckets = document.get("buckets")
    buckets_path: str | None = None
    rules: list[Rule] = []
    if isinstance(buckets, str):
        try:
            relative = _substituted(buckets, "buckets", env)
            _check_no_nul(relative, "buckets")
        except _Problem as problem:
            raise ConfigError(file, problem.field, problem.message) from None
        buckets_path = os.path.join(base_dir or "", relative)
        rules = load_buckets(buckets_path, environ=env)
    elif isinstance(buckets, list):
        rules = _build_rules(buckets, file, env)
    elif buckets is not None:
        raise ConfigError(
            file,
            "buckets",
            f"expected a list of rules or the path of a buckets file, got {_show(buckets)}",
        )
    config = Config(
        **msgspec.structs.asdict(settings), buckets=tuple(rules), buckets_path=buckets_path
    )
    if complete:
        _check_strict_capacity(config, file)
    return config


def load_buckets(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> list[Rule]:
    """Load a buckets.yaml: a list of rules, or a mapping whose only key is ``buckets``."""
    file = os.fspath(path)
    env = os.environ if environ is None else environ
    document = _parse_yaml(_read(file), file)
    if _is_config_map(document):
        # a Kubernetes ConfigMap manifest: the rules are the text of data."buckets.yaml"
        file, document = _config_map_entry(document, file, CONFIG_MAP_BUCKETS)
    if isinstance(document, dict):
        for field in document:
            if field != "buckets":
                raise ConfigError(
                    file,
                    str(field),
                    "is not a known field; a buckets file is a list of rules "
                    "or a mapping with just buckets:",
                )
        document = document.get("buckets")
    if document is None:
        return []
    if not isinstance(document, list):
        raise ConfigError(file, "buckets", f"expected a list of rules, got {_show(document)}")
    return _build_rules(document, file, env)


CONFIG_MAP_BUCKETS: Final = "buckets.yaml"
"""The entry of a ConfigMap's ``data`` that holds the rules (``buckets: cm.yaml``)."""


def _is_config_map(document: Any) -> bool:
    return (
        isinstance(document, dict)
        and document.get("kind") == "ConfigMap"
        and "apiVersion" in document
    )


def _config_map_entry(document: dict[str, Any], file: str, entry: str) -> tuple[str, Any]:
    """The parsed YAML text of ``data.<entry>`` of a ConfigMap manifest, and how errors
    name it (``cm.yaml: data."buckets.yaml"``)."""
    data = document.get("data")
    if not isinstance(data, dict) or not isinstance(data.get(entry), str):
        entries = ", ".join(f'"{name}"' for name in data) if isinstance(data, dict) else ""
        raise ConfigError(
            file,
            f'data."{entry}"',
            "is required: this ConfigMap holds no rules there"
            + (f" (its data has {entries})" if entries else " (it has no data)"),
        )
    where = f'{file}: data."{entry}"'
    return where, _parse_yaml(data[entry], where)


def _read(file: str) -> str:
    try:
        with open(file, encoding="utf-8") as stream:
            return stream.read()
    except UnicodeDecodeError:
        raise ConfigError(file, "", "is not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(file, "", f"cannot read the file: {error.strerror or error}") from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key
        self.line = line
        self.first_line = first_line


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in from an anchor may be overridden
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.setdefault(key, line)
        except TypeError:
            continue  # an unhashable key; construct_mapping reports it
        if first != line:
            raise _DuplicateKey(key, line, first)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, file: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as duplicate:
        raise ConfigError(
            file,
            "",
            f"duplicate key {duplicate.key!r} (first given on line {duplicate.first_line})",
            line=duplicate.line,
        ) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = error.problem or error.context or "invalid YAML"
        raise ConfigError(
            file,
            "",
            f"YAML syntax error: {problem}",
            line=None if mark is None else mark.line + 1,
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(file, "", f"YAML syntax error: {error}") from None


# -- ${VAR} substitution ----------------------------------------------------

_SUBSTITUTION = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_REFERENCE = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


def _substituted(value: Any, field: str, environ: Mapping[str, str]) -> Any:
    """``value`` with ``${VAR}`` replaced in every string inside it."""
    if isinstance(value, str):
        return _substitute(value, field, environ) if "${" in value else value
    if isinstance(value, dict):
        return {k: _substituted(v, _join(field, str(k)), environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_substituted(v, f"{field}[{i}]", environ) for i, v in enumerate(value)]
    return value


def _substitute(text: str, field: str, environ: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match.group(1)
        if body is None:
            raise _Problem(field, f"unclosed '${{' in {text!r}")
        reference = _REFERENCE.fullmatch(body)
        if reference is None:
            raise _Problem(
                field, f"bad substitution '${{{body}}}'; use ${{NAME}} or ${{NAME:-default}}"
            )
        name, default = reference["name"], reference["default"]
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise _Problem(
                field,
                f"environment variable {name} is not set "
                f"(set it, or give a default: ${{{name}:-default}})",
            )
        return value

    return _SUBSTITUTION.sub(replace, text)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _without_nulls(value: Any) -> Any:
    """Drop null values from mappings: an empty field means its default."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# -- settings ---------------------------------------------------------------

_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_REGION_RULE: Final = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


def _check_listeners(settings: _Settings) -> None:
    """``adminListen`` and ``envoyListen``: a ``host:port`` each, every one on a port of
    its own (port 0, a free port, excepted): two listeners on one port would fail to
    start, the second after the first already serves."""
    every = ("0.0.0.0", "::", "")
    taken = [("listen", settings.listen, *parse_listen(settings.listen))]
    for field, listen in (
        ("adminListen", settings.admin_listen),
        ("envoyListen", settings.envoy_listen),
    ):
        if listen is None:
            continue
        try:
            host, port = parse_listen(listen)
        except ValueError as error:
            raise _Problem(field, str(error)) from None
        for other, other_listen, other_host, other_port in taken:
            same_address = host == other_host or host in every or other_host in every
            if port and port == other_port and same_address:
                raise _Problem(
                    field,
                    f"must be another port than {other} ({other_listen!r}): each listener "
                    f"is a socket of its own, got {listen!r}",
                )
        taken.append((field, listen, host, port))


def _check_no_nul(value: Any, field: str) -> None:
    """No setting holds a NUL byte: none is a valid file name, URL or address."""
    if isinstance(value, str):
        if "\0" in value:
            raise _Problem(field, f"contains a NUL byte (\\0), got {value!r}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_no_nul(item, _join(field, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_no_nul(item, f"{field}[{index}]")


def _check_audit_path(settings: _Settings) -> None:
    """The audit trail and its rotations must not overwrite the state files: the
    snapshot and what lives beside it (``.wal.N``, ``.lock``, ``.idempotency``)."""
    audit, snapshot = settings.audit, settings.storage.snapshot
    if not audit.enabled or audit.path == "-" or not snapshot or "://" in snapshot:
        return
    trail, state = os.path.abspath(audit.path), os.path.abspath(snapshot)
    rotation = re.fullmatch(re.escape(trail) + r"\.[0-9]+", state)  # audit.path.N
    if trail == state or trail.startswith(state + ".") or rotation:
        raise _Problem(
            "audit.path",
            f"must not be storage.snapshot ({snapshot!r}) or a file beside it that "
            f"either one writes (its log, lock and rotations), got {audit.path!r}",
        )


def _settings_from_document(document: dict[str, Any]) -> _Settings:
    """Convert and check everything but the rules; raises _Problem."""
    document = _without_nulls(document)
    _check_no_nul(document, "")
    for field in ("listen", "envoyListen", "adminListen"):
        if isinstance(document.get(field), int) and not isinstance(document[field], bool):
            document[field] = f":{document[field]}"  # a bare port
    sync = document.get("sync")
    template_field = "sync.peerUrlTemplate"
    if isinstance(sync, dict) and isinstance(sync.get("peerUrls"), str):
        if "peerUrlTemplate" in sync:
            raise _Problem(
                "sync.peerUrls", "is a template and so is sync.peerUrlTemplate; keep one"
            )
        sync = dict(sync)
        sync["peerUrlTemplate"] = sync.pop("peerUrls")
        document["sync"] = sync
        template_field = "sync.peerUrls"
    settings = _convert(document, _Settings, extra_fields=("buckets",))

    for field in ("region", "node"):
        value = getattr(settings, field)
        if _REGION.fullmatch(value) is None:
            raise _Problem(field, f"must be {_REGION_RULE}, got {value!r}")
    for field, listen in (("listen", settings.listen), ("envoyListen", settings.envoy_listen)):
        if listen is not None:
            try:
                parse_listen(listen)
            except ValueError as error:
                raise _Problem(field, str(error)) from None
    _check_listeners(settings)
    if settings.default_state_key:
        try:
            KeyTemplate(settings.default_state_key)
        except RuleError as error:
            raise _Problem("defaultStateKey", error.problem) from None
    if not 0.0 <= settings.near_limit <= 1.0:
        raise _Problem(
            "nearLimit",
            f"must be a share of capacity from 0 to 1 (0.2 is 20 %), got {settings.near_limit!r}",
        )
    checked = msgspec.structs.replace(
        settings,
        default_state_key=settings.default_state_key or None,
        audit=_checked_audit(settings.audit),
        sync=_checked_sync(settings.sync, template_field),
        storage=_checked_storage(settings.storage),
        admin=_checked_admin(settings.admin),
        tls=_checked_tls(settings.tls),
    )
    _check_audit_path(checked)
    return checked


def _checked_secrets(
    field: str, value: str | tuple[str, ...] | None
) -> str | tuple[str, ...] | None:
    """One secret or a list of them; an empty one, or an empty list, is none at all."""
    if value is None or isinstance(value, str):
        return value or None
    for index, item in enumerate(value):
        if not item:
            raise _Problem(f"{field}[{index}]", "must not be empty")
    if len(set(value)) != len(value):
        raise _Problem(field, "lists a secret twice")
    return (value[0] if len(value) == 1 else value) if value else None


def _checked_admin(admin: AdminConfig) -> AdminConfig:
    token = _checked_secrets("admin.token", admin.token)
    token_file = admin.token_file or None
    if token is not None and token_file is not None:
        raise _Problem("admin.tokenFile", "cannot be given with admin.token; keep one")
    if token_file is not None:
        token = _read_secret(token_file, "admin.tokenFile")
    return AdminConfig(token=token, token_file=token_file)


def _checked_audit(audit: AuditConfig) -> AuditConfig:
    if not 0.0 <= audit.sample <= 1.0:
        raise _Problem(
            "audit.sample",
            f"must be the share of decisions written, from 0 to 1, got {audit.sample!r}",
        )
    if not audit.path:
        raise _Problem("audit.path", "must name a file, or - for stdout")
    if audit.enabled and audit.path != "-":
        directory = os.path.dirname(os.path.abspath(audit.path))
        if not os.path.isdir(directory):
            raise _Problem("audit.path", f"is in a directory that does not exist, {directory!r}")
        if os.path.isdir(audit.path):
            raise _Problem("audit.path", f"names a directory, {audit.path!r}; give a file")
    return audit


def _checked_tls(tls: TlsConfig) -> TlsConfig:
    if (tls.cert_file is None) != (tls.key_file is None) and tls.key_file is not None:
        raise _Problem("tls.certFile", "is required with tls.keyFile")
    if tls.client_auth != "none" and tls.ca_file is None:
        raise _Problem(
            "tls.caFile",
            f"is required with tls.clientAuth: {tls.client_auth} (the CA that signs the "
            "client certificates)",
        )
    if tls.client_auth != "none" and tls.cert_file is None:
        raise _Problem("tls.certFile", f"is required with tls.clientAuth: {tls.client_auth}")
    if tls.pin_regions and tls.client_auth == "none":
        raise _Problem("tls.pinRegions", "needs tls.clientAuth sync or all")
    for field, path in (
        ("tls.certFile", tls.cert_file),
        ("tls.keyFile", tls.key_file),
        ("tls.caFile", tls.ca_file),
    ):
        if path is not None and not os.path.isfile(path):
            raise _Problem(field, f"names no readable file, {path!r}")
    return tls


def _checked_sync(sync: SyncConfig, template_field: str) -> SyncConfig:
    """The sync section checked on its own; what it needs once enabled (a secret, a
    URL per peer) may still come from overrides: ``_completed`` checks that."""
    if not sync.sync_cluster_id:
        raise _Problem("sync.syncClusterId", "must not be empty")
    listed: dict[str, int] = {}
    for index, peer in enumerate(sync.peers):
        if _REGION.fullmatch(peer) is None:
            raise _Problem(f"sync.peers[{index}]", f"must be {_REGION_RULE}, got {peer!r}")
        if peer in listed:
            raise _Problem("sync.peers", f"lists {peer!r} twice")
        listed[peer] = index
    peers = sync.peers or tuple(sync.peer_urls)
    for peer, url in sync.peer_urls.items():
        field = f"sync.peerUrls.{peer}"
        if peer not in peers:
            hint = difflib.get_close_matches(peer, peers, n=1)
            raise _Problem(
                field,
                "is not a region listed in sync.peers"
                + (f" (did you mean {hint[0]}?)" if hint else ""),
            )
        _check_url(field, url)
    template = sync.peer_url_template
    if template is not None:
        if "{region}" not in template:
            raise _Problem(template_field, f"must contain {{region}}, got {template!r}")
        _check_url(template_field, template.replace("{region}", "region"))
    if sync.discovery is not None:
        _checked_discovery(sync.discovery)
    secret = _checked_secrets("sync.secret", sync.secret)
    secret_file = sync.secret_file or None
    if secret is not None and secret_file is not None:
        raise _Problem("sync.secretFile", "cannot be given with sync.secret; keep one")
    return msgspec.structs.replace(sync, peers=peers, secret=secret, secret_file=secret_file)


def _checked_discovery(discovery: DiscoveryConfig) -> None:
    name = discovery.dns.rstrip(".")
    labels = name.split(".")
    if not name or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise _Problem(
            "sync.discovery.dns",
            f"must be a DNS name such as bucketmesh-headless.ns.svc.cluster.local, got "
            f"{discovery.dns!r}",
        )
    if not _DNS_LABEL.fullmatch(discovery.port_name):
        raise _Problem(
            "sync.discovery.portName",
            f"must be a Service port's name such as http, got {discovery.port_name!r}",
        )
    if discovery.resolver is not None:
        try:
            host, port = parse_listen(discovery.resolver)
            ipaddress.ip_address(host)
        except ValueError:
            raise _Problem(
                "sync.discovery.resolver",
                f"must be a DNS server's ip:port such as 10.96.0.10:53, got {discovery.resolver!r}",
            ) from None
        if not port:
            raise _Problem("sync.discovery.resolver", "needs a port other than 0")


_DNS_LABEL: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")

DEFAULT_PEER_URL_TEMPLATE: Final = "http://bucketmesh-{region}:{port}"
"""The peer URLs of an enabled mesh that gives none (neither a map nor a template):
one Kubernetes Service per region, named ``bucketmesh-<region>``, on the port this
node listens on (8080 when it listens on port 0)."""

_SECRET_HELP: Final = (
    "is required when sync.enabled is true: set sync.secret "
    "(e.g. secret: ${BUCKETMESH_SYNC_SECRET}) or the environment variable "
    "BUCKETMESH_SYNC_SECRET, or point sync.secretFile or BUCKETMESH_SYNC_SECRET_FILE "
    "at a file holding it (a mounted Kubernetes Secret)"
)


def _completed(settings: _Settings, *, require_secret: bool = True) -> _Settings:
    """``settings`` once every source has spoken: an enabled mesh gets its secret
    (``sync.secret``, else the file ``sync.secretFile`` names) and a URL for every
    peer (``sync.peerUrls``, else ``DEFAULT_PEER_URL_TEMPLATE``). Raises _Problem
    naming the field, and the variable that can also give it, for what is missing."""
    sync = settings.sync
    if not sync.enabled:
        return settings
    secret, secret_file = sync.secret, sync.secret_file
    if secret is None and secret_file is not None:
        # the completed config holds the secrets; the node reads the file again on change
        secret = _read_secret(secret_file, "sync.secretFile")
    if secret is None and require_secret:
        raise _Problem("sync.secret", _SECRET_HELP)
    if sync.discovery is not None and not settings.region.endswith("." + settings.node):
        raise _Problem(
            "sync.discovery",
            f"needs this node's region to be its slot, <region>.<node> (here "
            f"<region>.{settings.node}), got region {settings.region!r}: the nodes found "
            "are slots of the same region (docs/scale.md)",
        )
    template = sync.peer_url_template
    if not sync.peer_urls and template is None:
        port = parse_listen(settings.listen)[1] or 8080
        template = DEFAULT_PEER_URL_TEMPLATE.replace("{port}", str(port))
    for peer in sync.peers:
        if peer != settings.region and peer not in sync.peer_urls and template is None:
            raise _Problem(
                "sync.peerUrls",
                f"has no URL for region {peer!r}, which sync.peers lists; add "
                f"sync.peerUrls.{peer} (or BUCKETMESH_SYNC_PEER_URLS=region=url,...), "
                'or give a template such as "http://bucketmesh-{region}:8080" instead of a map',
            )
    return msgspec.structs.replace(
        settings,
        sync=msgspec.structs.replace(
            sync, secret=secret, secret_file=secret_file, peer_url_template=template
        ),
    )


def _read_secret(path: str, field: str) -> str | tuple[str, ...]:
    """The secrets in the file at ``path``, one per line (the first signs); a single
    one as a string."""
    try:
        secrets = read_secret_file(path)
    except UnicodeDecodeError:
        raise _Problem(field, f"{path!r} is not UTF-8 text") from None
    except OSError as error:
        raise _Problem(field, f"cannot read {path!r}: {error.strerror or error}") from None
    if not secrets:
        raise _Problem(field, f"names an empty file, {path!r}")
    return secrets[0] if len(secrets) == 1 else secrets


def read_secret_file(path: str) -> tuple[str, ...]:
    """The non-empty lines of a secret file, without their line breaks; raises
    OSError or UnicodeDecodeError (``node/reload.py`` reads it again on change)."""
    with open(path, encoding="utf-8") as stream:
        lines = stream.read().splitlines()
    return tuple(dict.fromkeys(line.strip("\r") for line in lines if line.strip()))


def _check_url(field: str, url: str) -> None:
    problem = f"must be an http:// or https:// URL, got {url!r}"
    try:
        parts = urlsplit(url)
        _ = parts.port  # parsing the port validates it
    except ValueError:
        raise _Problem(field, problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise _Problem(field, problem)


def _checked_storage(storage: StorageConfig) -> StorageConfig:
    if storage.backend == "redis":
        scheme = urlsplit(storage.redis_url).scheme
        if scheme in ("redis-cluster", "rediss-cluster"):
            # Redis Cluster: startup nodes host:port[,host:port...] (storage-redis.md)
            from bucketmesh.storage.redis_store import parse_cluster_url

            try:
                parse_cluster_url(storage.redis_url)
            except ValueError as error:
                raise _Problem("storage.redisUrl", str(error)) from None
        elif scheme not in ("redis", "rediss", "unix"):
            raise _Problem(
                "storage.redisUrl",
                "must be a redis://, rediss://, unix://, redis-cluster:// or "
                f"rediss-cluster:// URL, got {storage.redis_url!r}",
            )
    if storage.snapshot and storage.snapshot.startswith("dynamodb://"):
        # a node without a volume: the state files mirrored in DynamoDB (storage/dynamodb.py)
        from bucketmesh.storage.dynamodb import parse_uri

        try:
            parse_uri(storage.snapshot)
        except ValueError as error:
            raise _Problem("storage.snapshot", str(error)) from None
    return msgspec.structs.replace(storage, snapshot=storage.snapshot or None)


def parse_listen(text: str) -> tuple[str, int]:
    """``"0.0.0.0:8080"`` → ``("0.0.0.0", 8080)``; ``":8080"`` means every interface
    (``0.0.0.0``), ``"[::1]:8080"`` an IPv6 address. Port 0 picks a free port."""
    usage = f"expected host:port such as 0.0.0.0:8080, :8080 or [::1]:8080, got {text!r}"
    if text.startswith("["):
        host, separator, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(usage) from None
    else:
        host, separator, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{usage} (an IPv6 address goes in brackets)")
        if host and re.fullmatch(r"[A-Za-z0-9._-]+", host) is None:
            raise ValueError(usage)
        host = host or "0.0.0.0"
    if not separator or not (port.isascii() and port.isdigit()):
        raise ValueError(usage)
    if int(port) > 65535:
        raise ValueError(f"port must be 0-65535, got {text!r}")
    return host, int(port)


# -- rules ------------------------------------------------------------------


def _build_rules(entries: list[Any], file: str, environ: Mapping[str, str]) -> list[Rule]:
    substituted: list[Any] = []
    for number, entry in enumerate(entries, 1):
        try:
            substituted.append(_without_nulls(_substituted(entry, "", environ)))
        except _Problem as problem:
            raise ConfigError(
                file, problem.field, problem.message, rule=number, rule_name=_explicit_name(entry)
            ) from None
    names = _rule_names(substituted, file)
    rules: list[Rule] = []
    first_with_key: dict[str, int] = {}
    for number, (entry, name) in enumerate(zip(substituted, names, strict=True), 1):
        try:
            rule = _rule_from_entry(entry, name)
            if rule.key in first_with_key:
                other = first_with_key[rule.key]
                raise _Problem(
                    "key",
                    f"is the same template as rule {other} ({names[other - 1]}); "
                    "their bucket keys would collide",
                )
        except _Problem as problem:
            raise ConfigError(
                file, problem.field, problem.message, rule=number, rule_name=name
            ) from None
        first_with_key[rule.key] = number
        rules.append(rule)
    return rules


def _explicit_name(entry: Any) -> str | None:
    name = entry.get("name") if isinstance(entry, dict) else None
    return name if isinstance(name, str) and name else None


def _rule_names(entries: list[Any], file: str) -> list[str]:
    """Each rule's name: its own, else one derived from its key, made unique."""
    explicit = [_explicit_name(entry) for entry in entries]
    first_with_name: dict[str, int] = {}
    for number, name in enumerate(explicit, 1):
        if name is None:
            continue
        if name in first_with_name:
            raise ConfigError(
                file,
                "name",
                f"{name!r} is already the name of rule {first_with_name[name]}",
                rule=number,
                rule_name=name,
            )
        first_with_name[name] = number
    taken = set(first_with_name)
    names: list[str] = []
    for number, (entry, given) in enumerate(zip(entries, explicit, strict=True), 1):
        if given is not None:
            names.append(given)
            continue
        base = _derived_name(entry) or f"rule-{number}"
        name, suffix = base, 2
        while name in taken:
            name, suffix = f"{base}-{suffix}", suffix + 1
        taken.add(name)
        names.append(name)
    return names


def _derived_name(entry: Any) -> str:
    key = entry.get("key") if isinstance(entry, dict) else None
    if not isinstance(key, str):
        return ""
    try:
        return KeyTemplate(key).default_name
    except ValueError:
        return ""


def _rule_from_entry(entry: Any, name: str) -> Rule:
    if not isinstance(entry, dict):
        raise _Problem(
            "", f"expected a mapping with key and capacity/refillRate or rate, got {_show(entry)}"
        )
    spec = _convert(entry, _BucketEntry)
    try:
        template = KeyTemplate(spec.key)
    except RuleError as error:
        raise _Problem(error.field, error.problem) from None

    refill_field, refill = "refillRate", spec.refill_rate
    if spec.refill_rate_alias is not None:
        if refill is not None:
            raise _Problem("refill_rate", "cannot be given with refillRate; they are the same")
        refill_field, refill = "refill_rate", spec.refill_rate_alias
    capacity = spec.capacity
    # The file's field each limit came from: "rate" when the shorthand gave it.
    sources = {"capacity": "capacity", "refillRate": refill_field, "ttl": "ttl", "mode": "mode"}
    if spec.rate is not None:
        if refill is not None:
            raise _Problem("rate", f"cannot be combined with {refill_field}; give one of them")
        try:
            rate_capacity, refill = parse_rate(spec.rate)
        except RuleError as error:
            raise _Problem(error.field, error.problem) from None
        sources["refillRate"] = "rate"
        if capacity is None:
            capacity, sources["capacity"] = rate_capacity, "rate"
    elif capacity is None and refill is None:
        raise _Problem("", 'needs capacity and refillRate, or a rate such as "100/minute"')
    elif capacity is None:
        raise _Problem("capacity", f"is required with {refill_field} (or give a rate instead)")
    elif refill is None:
        raise _Problem(
            "refillRate", "is required with capacity (tokens per second), or give a rate instead"
        )
    on_store_failure = spec.on_store_failure
    if spec.on_store_failure_alias is not None:
        if "onStoreFailure" in entry:
            raise _Problem(
                "on_store_failure", "cannot be given with onStoreFailure; they are the same"
            )
        on_store_failure = spec.on_store_failure_alias
    try:
        check_limits(capacity=capacity, refill_rate=refill, ttl=spec.ttl, mode=spec.mode)
    except LimitError as error:
        raise _limit_problem(error, sources.get(error.field, error.field), entry) from None
    fields = {"refill_rate": refill_field, "ttl": "ttl"}
    try:
        return Rule(
            name=name,
            key=spec.key,
            template=template,
            capacity=capacity,
            refill_rate=float(refill),
            ttl=float(spec.ttl),
            mode=spec.mode,
            on_store_failure=on_store_failure,
            shadow=spec.shadow,
        )
    except RuleError as error:
        raise _Problem(fields.get(error.field, error.field), error.problem) from None


def _limit_problem(error: LimitError, source: str, entry: dict[str, Any]) -> _Problem:
    """A limit out of range, named by the file's field it came from, shown as written."""
    if source == "rate":
        return _Problem(
            "rate",
            f"{_show(entry.get('rate'))} gives {error.field} {error.value!r}, "
            f"which {error.requirement}",
        )
    shown = _show(entry[source]) if source in entry else repr(error.value)
    return _Problem(source, f"{error.requirement}, got {shown}")


# -- overrides --------------------------------------------------------------

ENV_OVERRIDES: Final[Mapping[str, str]] = {
    "BUCKETMESH_REGION": "region",
    "BUCKETMESH_NODE": "node",
    "BUCKETMESH_LISTEN": "listen",
    "BUCKETMESH_ENVOY_LISTEN": "envoy_listen",
    "BUCKETMESH_ADMIN_LISTEN": "admin_listen",
    "BUCKETMESH_DEFAULT_STATE_KEY": "default_state_key",
    "BUCKETMESH_SYNC_ENABLED": "sync.enabled",
    "BUCKETMESH_SYNC_CLUSTER_ID": "sync.sync_cluster_id",
    "BUCKETMESH_SYNC_PEERS": "sync.peers",
    "BUCKETMESH_SYNC_PEER_URLS": "sync.peer_urls",
    "BUCKETMESH_SYNC_SECRET": "sync.secret",
    "BUCKETMESH_SYNC_SECRET_FILE": "sync.secret_file",
    "BUCKETMESH_SYNC_INTERVAL": "sync.interval_ms",
    "BUCKETMESH_SYNC_PEER_TIMEOUT": "sync.peer_timeout_ms",
    "BUCKETMESH_SYNC_UNRECOVERED_WAIT": "sync.unrecovered_wait_ms",
    "BUCKETMESH_STORAGE_BACKEND": "storage.backend",
    "BUCKETMESH_STORAGE_SNAPSHOT": "storage.snapshot",
    "BUCKETMESH_STORAGE_REDIS_URL": "storage.redis_url",
    "BUCKETMESH_STORAGE_DURABILITY": "storage.durability",
    "BUCKETMESH_STORAGE_SNAPSHOT_INTERVAL": "storage.snapshot_interval_ms",
    "BUCKETMESH_STORAGE_REDIS_TIMEOUT": "storage.redis_timeout_ms",
    "BUCKETMESH_ADMIN_TOKEN": "admin.token",
    "BUCKETMESH_ADMIN_TOKEN_FILE": "admin.token_file",
    "BUCKETMESH_TLS_CERT_FILE": "tls.cert_file",
    "BUCKETMESH_TLS_KEY_FILE": "tls.key_file",
    "BUCKETMESH_TLS_CA_FILE": "tls.ca_file",
    "BUCKETMESH_TLS_CLIENT_AUTH": "tls.client_auth",
    "BUCKETMESH_LIMITS_MAX_BUCKETS": "limits.max_buckets",
    "BUCKETMESH_LIMITS_MAX_BODY_BYTES": "limits.max_body_bytes",
    "BUCKETMESH_LIMITS_MAX_HEADER_BYTES": "limits.max_header_bytes",
    "BUCKETMESH_LIMITS_MAX_IN_FLIGHT": "limits.max_in_flight",
    "BUCKETMESH_LIMITS_SHED_LAG": "limits.shed_lag_ms",
    "BUCKETMESH_LIMITS_HEADER_TIMEOUT": "limits.header_timeout_ms",
    "BUCKETMESH_LIMITS_BODY_TIMEOUT": "limits.body_timeout_ms",
    "BUCKETMESH_LIMITS_KEEPALIVE_TIMEOUT": "limits.keepalive_timeout_ms",
    "BUCKETMESH_AUDIT_ENABLED": "audit.enabled",
    "BUCKETMESH_AUDIT_PATH": "audit.path",
    "BUCKETMESH_AUDIT_SAMPLE": "audit.sample",
    "BUCKETMESH_AUDIT_HASH_KEYS": "audit.hash_keys",
    "BUCKETMESH_NEAR_LIMIT": "near_limit",
    "BUCKETMESH_BUCKETS": "buckets",
}
"""Environment variable → the dotted setting it overrides."""


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The overrides the ``BUCKETMESH_*`` variables in ``environ`` ask for, by dotted key."""
    return {key: environ[var] for var, key in ENV_OVERRIDES.items() if var in environ}


def apply_overrides(
    config: Config,
    overrides: Mapping[str, str],
    *,
    origin: Mapping[str, str] | None = None,
    require_secret: bool = True,
) -> Config:
    """``config`` with settings replaced, converted and validated as the file's are.

    Keys are dotted, snake_case or the file's camelCase (``sync.secret``,
    ``storage.redisUrl``); values are text as flags and variables give them:
    booleans true/false/yes/no/on/off/1/0, lists comma-separated, ``sync.peer_urls``
    either ``region=url,...`` or a ``{region}`` template, an empty value clears an
    optional setting, and ``buckets`` is the path of a buckets file. ``origin``
    maps a key to what errors call it (``--listen``, ``BUCKETMESH_LISTEN``).
    ``sync.secret`` and ``sync.secret_file`` replace each other. The result is
    complete (see ``load_config``); ``require_secret=False`` lets an enabled mesh
    go without a secret (``--insecure-sync``).
    """
    labels: dict[str, str] = {}
    document = {
        field.encode_name: msgspec.to_builtins(getattr(config, field.name))
        for field in msgspec.structs.fields(_Settings)
    }
    for part, value_field, file_field in (
        ("sync", "secret", "secretFile"),
        ("admin", "token", "tokenFile"),
    ):
        if document[part].get(file_field):
            document[part][value_field] = None  # read from the file: read again
    buckets_path = config.buckets_path
    rules = config.buckets
    for key, value in overrides.items():
        label = (origin or {}).get(key, f"override {key}")
        if key == "buckets":
            if not value:
                raise ConfigError(
                    label, "buckets", "is empty: give the path of a buckets file, or unset it"
                )
            buckets_path, rules = value, tuple(load_buckets(value))
            continue
        try:
            section, field, kind = _setting(key)
            setting = _override_value(kind, value, key)
        except _Problem as problem:
            raise ConfigError(label, problem.field, problem.message) from None
        target = document if section is None else document.setdefault(section, {})
        if field == "peerUrls":
            # Given here, the URLs replace both the file's map and its template.
            target["peerUrls"], target["peerUrlTemplate"] = {}, None
            labels["sync.peerUrlTemplate"] = label
        if field in ("secret", "secretFile") and section == "sync":
            # Given here, one replaces the file's other: the environment beats the file.
            target["secret"] = target["secretFile"] = None
        if field in ("token", "tokenFile") and section == "admin":
            target["token"] = target["tokenFile"] = None
        target[field] = setting
        labels[_join(section or "", field)] = label
    try:
        settings = _completed(_settings_from_document(document), require_secret=require_secret)
    except _Problem as problem:
        label = next(
            (
                label
                for key, label in labels.items()
                if problem.field == key or problem.field.startswith((key + ".", key + "["))
            ),
            config.path or "<config>",
        )
        raise ConfigError(label, problem.field, problem.message) from None
    completed = Config(
        **msgspec.structs.asdict(settings),
        buckets=rules,
        path=config.path,
        buckets_path=buckets_path,
    )
    _check_strict_capacity(completed, config.path or "<config>")
    return completed


def _check_strict_capacity(config: Config, file: str) -> None:
    """A strict rule splits its capacity into one share per region of the mesh, so it
    needs at least one token per region; a ConfigError naming the rule's file (the
    buckets file, if the rules come from one) and its ``capacity`` otherwise. Checked
    once the regions are known: ``sync.peers`` may come from a flag or variable."""
    regions = config.regions
    for number, rule in enumerate(config.buckets, 1):
        if rule.mode == STRICT and rule.capacity < len(regions):
            raise ConfigError(
                config.buckets_path or file,
                "capacity",
                f"must be >= the number of regions ({len(regions)}: {', '.join(regions)}) "
                f"in strict mode, got {rule.capacity}: each region holds a share of at "
                "least one token",
                rule=number,
                rule_name=rule.name,
            )


def _setting(key: str) -> tuple[str | None, str, Any]:
    """The section and field (file spelling) a dotted key names, and the field's type."""
    names = key.split(".")
    schema: type[msgspec.Struct] = _Settings
    section: str | None = None
    if len(names) == 2:
        info = _field_info(_Settings, names[0])
        nested = _struct_in(info.type) if info is not None else None
        if info is None or nested is None:
            raise _Problem(key, f"is not a known setting{_suggestion(key, _SETTING_KEYS)}")
        schema, section = nested, info.encode_name
    elif len(names) != 1:
        raise _Problem(key, f"is not a known setting{_suggestion(key, _SETTING_KEYS)}")
    info = _field_info(schema, names[-1])
    if info is None or (section is None and _struct_in(info.type) is not None):
        raise _Problem(key, f"is not a known setting{_suggestion(key, _SETTING_KEYS)}")
    return section, info.encode_name, info.type


def _override_value(kind: Any, value: str, key: str) -> Any:
    kinds = _type_args(kind)
    if value == "" and type(None) in kinds:
        return None
    if bool in kinds:
        truth = {"true": True, "yes": True, "on": True, "1": True}
        truth |= {"false": False, "no": False, "off": False, "0": False}
        return truth.get(value.strip().lower(), value)
    if str in kinds and tuple in kinds:
        return value  # one secret or token: a list of them comes from the file
    if tuple in kinds:
        return [item.strip() for item in value.split(",") if item.strip()]
    if dict in kinds and "=" in value:
        urls: dict[str, str] = {}
        for pair in value.split(","):
            region, separator, url = pair.partition("=")
            if not separator or not region.strip():
                raise _Problem(key, f"expected region=url pairs separated by commas, got {value!r}")
            urls[region.strip()] = url.strip()
        return urls
    return value


def _field_info(schema: type[msgspec.Struct], name: str) -> msgspec.structs.FieldInfo | None:
    for info in msgspec.structs.fields(schema):
        if name in (info.name, info.encode_name):
            return info
    return None


def _struct_in(kind: Any) -> type[msgspec.Struct] | None:
    for arg in _type_args(kind):
        if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
            return arg
    return None


def _type_args(kind: Any) -> list[Any]:
    """The plain types in an annotation: ``Annotated[int, …] | None`` → ``[int, None]``."""
    origin = typing.get_origin(kind)
    if origin is Annotated:
        return _type_args(typing.get_args(kind)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [t for arg in typing.get_args(kind) for t in _type_args(arg)]
    if origin is Literal:
        return list(typing.get_args(kind))
    return [origin or kind]


def _setting_keys() -> list[str]:
    keys: list[str] = []
    for info in msgspec.structs.fields(_Settings):
        section = _struct_in(info.type)
        if section is None:
            keys.append(info.name)
        else:
            keys += [f"{info.name}.{field.name}" for field in msgspec.structs.fields(section)]
    return [*keys, "buckets"]


_SETTING_KEYS: Final = _setting_keys()


# -- validation messages ----------------------------------------------------

# What a value of each type is called in messages.
_TYPE_NAMES: Final[Mapping[Any, str]] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "a mapping",
    tuple: "a list",
    list: "a list",
    type(None): "nothing",
}
# Fields whose file form is looser than their type (normalized before conversion).
_EXPECTED: Final[Mapping[str, str]] = {
    "sync.peerUrls": "a mapping of region to URL or a {region} template string",
}
_BOUNDS: Final = ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt"))


_T = typing.TypeVar("_T", bound=msgspec.Struct)


def _convert(raw: dict[str, Any], schema: type[_T], extra_fields: tuple[str, ...] = ()) -> _T:
    """``msgspec.convert`` that raises a _Problem worded for people.

    Lax mode lets numbers and booleans arrive as strings, which is how ``${VAR}``
    substitution and overrides deliver them.
    """
    try:
        return msgspec.convert(raw, schema, strict=False)
    except msgspec.ValidationError as error:
        raise _explain(error_location(error), raw, schema, extra_fields) from None


def _explain(
    location: ErrorLocation, raw: Any, schema: type[msgspec.Struct], extra_fields: tuple[str, ...]
) -> _Problem:
    """The problem msgspec found at ``location``, worded from our schema and the value
    there; only the location comes from msgspec (``core.limits.error_location``)."""
    value: Any = raw
    kind: Any = schema
    names: list[str] = []
    for step in location.path:
        if isinstance(step, str):
            names.append(step)
            struct = _struct_in(kind)
            info = _field_info(struct, step) if struct is not None else None
            kind = info.type if info is not None else None
            value = value.get(step) if isinstance(value, dict) else None
        elif step is ...:
            # msgspec does not say which value of a mapping is wrong: the first that is.
            entries = value if isinstance(value, dict) else {}
            kind = _item_type(kind, dict)
            bad = next((k for k, v in entries.items() if not _fits(v, kind)), "...")
            names.append(str(bad))
            value = entries.get(bad)
        else:
            names.append(f"{names.pop()}[{step}]" if names else f"[{step}]")
            value = value[step] if isinstance(value, list) and step < len(value) else None
            kind = _item_type(kind, tuple)
    field = ".".join(names)

    if location.in_key:
        return _Problem(field, "has a field name that is not a string")
    if location.name is not None:
        struct = _struct_in(kind)
        known = [info.encode_name for info in msgspec.structs.fields(struct)] if struct else []
        if location.name in known:
            return _Problem(_join(field, location.name), "is required")
        if not names:
            known += extra_fields
        return _Problem(
            _join(field, location.name),
            f"is not a known field{_suggestion(location.name, known)}",
        )
    if kind is None:
        return _Problem(field, location.detail)
    choices = [choice for choice in _type_args(kind) if isinstance(choice, str)]
    if choices and isinstance(value, str):
        return _Problem(field, f"must be {_one_of(choices)}, got {_show(value)}")
    if not _fits(value, _unconstrained(kind)):
        expected = _EXPECTED.get(field) or _describe(kind)
        return _Problem(field, f"expected {expected}, got {_show(value)}")
    converted = msgspec.convert(value, _unconstrained(kind), strict=False)
    for meta in _metas(kind):
        for operator, attribute in _BOUNDS:
            limit = getattr(meta, attribute)
            if limit is not None and not _holds(converted, operator, limit):
                shown = str(limit).removesuffix(".0")
                return _Problem(field, f"must be {operator} {shown}, got {_show(value)}")
    return _Problem(field, location.detail)


def _members(kind: Any) -> list[Any]:
    """A union's members without ``Annotated``: ``Annotated[int, …] | None`` → ``[int, None]``."""
    origin = typing.get_origin(kind)
    if origin is Annotated:
        return _members(typing.get_args(kind)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [member for arg in typing.get_args(kind) for member in _members(arg)]
    return [kind]


def _unconstrained(kind: Any) -> Any:
    """``kind`` without its ``Annotated`` constraints."""
    members = _members(kind)
    return members[0] if len(members) == 1 else typing.Union[tuple(members)]  # noqa: UP007


def _metas(kind: Any) -> list[msgspec.Meta]:
    """The ``msgspec.Meta`` constraints anywhere in ``kind``."""
    origin = typing.get_origin(kind)
    if origin is Annotated:
        inner, *extras = typing.get_args(kind)
        return [extra for extra in extras if isinstance(extra, msgspec.Meta)] + _metas(inner)
    if origin is typing.Union or origin is types.UnionType:
        return [meta for arg in typing.get_args(kind) for meta in _metas(arg)]
    return []


def _item_type(kind: Any, container: type) -> Any:
    """The type of a value in the mapping (``dict``) or list (``tuple``) ``kind`` allows."""
    for member in _members(kind):
        origin = typing.get_origin(member)
        if origin is dict and container is dict:
            return typing.get_args(member)[1]
        if origin in (tuple, list) and container is tuple:
            return typing.get_args(member)[0]
    return None


def _fits(value: Any, kind: Any) -> bool:
    """Whether ``value`` converts to ``kind`` as ``_convert`` would (lax); True when
    ``kind`` is unknown."""
    if kind is None:
        return True
    try:
        msgspec.convert(value, kind, strict=False)
    except msgspec.ValidationError:
        return False
    return True


def _holds(value: Any, operator: str, limit: float) -> bool:
    if operator == ">=":
        return bool(value >= limit)
    if operator == ">":
        return bool(value > limit)
    if operator == "<=":
        return bool(value <= limit)
    return bool(value < limit)


def _describe(kind: Any) -> str:
    """What a value of ``kind`` is called: ``str | None`` → ``a string``."""
    names: list[str] = []
    for member in _members(kind):
        if typing.get_origin(member) is Literal:
            plain = [type(choice) for choice in typing.get_args(member)]
        elif isinstance(member, type) and issubclass(member, msgspec.Struct):
            plain = [dict]
        else:
            plain = [typing.get_origin(member) or member]
        for each in plain:
            name = _TYPE_NAMES.get(each, getattr(each, "__name__", str(each)))
            if name not in names:
                names.append(name)
    if len(names) > 1:
        names = [name for name in names if name != "nothing"]
    return " or ".join(names)


def _one_of(choices: list[str]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]


def _suggestion(name: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    return f"; known: {', '.join(known)}" if known else ""


def _show(value: Any) -> str:
    """A value as the user wrote it, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def load_limiter(
    path: str,
    *,
    replica_id: str,
    clock: Callable[[], int] = time.time_ns,
    regions: int | None = None,
) -> Limiter:
    """An in-process limiter with the rules (and bucket cap) of a bucketmesh.yaml or
    a buckets.yaml; ``regions`` defaults to the config's (strict mode's shares). What
    only a serving node needs (the mesh's secret and peer URLs, strict capacity against
    the mesh's regions) is not asked of the file: the limiter checks its ``regions``."""
    try:
        config = load_config(path, complete=False)
    except ConfigError:
        rules = load_buckets(path)
        return Limiter(rules, replica_id=replica_id, clock=clock, regions=regions or 1)
    return Limiter(
        config.buckets,
        replica_id=replica_id,
        clock=clock,
        max_buckets=config.limits.max_buckets,
        regions=regions or len(config.regions),
    )

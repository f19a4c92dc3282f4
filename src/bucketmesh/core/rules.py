"""What a bucket rule is: its key template, its limits and the rate shorthand.

A rule says which requests share a bucket (the key template, e.g.
``agent-api-key-{{ .Request.Header.X-API-Key }}``) and how that bucket behaves
(capacity, refill rate, ttl, replication mode). This module parses and validates
rules and renders bucket keys on the request hot path; it does no I/O and reads
no clock. Loading rules from YAML lives in ``config``.

Keys built from request text are injective (docs/api.md "Bucket keys"): a
substituted value is percent-escaped (``%`` always, and the first character of the
literal text after each placeholder that another placeholder follows), so one
template never renders two sets of values as one key; and a rule uses a rendered
key as it reads only when it is the first rule whose template could have produced
it (the rule the API resolves that key to), else with ``%@<rule name>`` appended
(``QUALIFIER``), so two rules never share a bucket. ``own_key`` applies the same
to keys built elsewhere (Envoy descriptors).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal, Protocol, TypeAlias, get_args
from urllib.parse import unquote

import msgspec

from bucketmesh.core.bucket import MODES, SHARED
from bucketmesh.core.limits import LimitError, check_limits

__all__ = [
    "DEFAULT_TTL",
    "MODES",
    "QUALIFIER",
    "STORE_FAILURE_POLICIES",
    "KeyTemplate",
    "Missing",
    "Mode",
    "Rule",
    "RuleError",
    "Shadows",
    "StoreFailurePolicy",
    "descriptor_key",
    "descriptor_rule_names",
    "escaper",
    "first_match",
    "hashed_value",
    "key_of_rule",
    "own_key",
    "owner_of",
    "parse_rate",
]

Mode: TypeAlias = str
"""One of ``MODES`` (defined once, in ``core.bucket``; ``core.limits`` checks it)."""
StoreFailurePolicy = Literal["allow", "deny", "local"]
STORE_FAILURE_POLICIES: Final[tuple[str, ...]] = get_args(StoreFailurePolicy)
DEFAULT_TTL: Final = 3600.0

_UNIT_SECONDS: Final[Mapping[str, int]] = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
}
_RATE = re.compile(
    r"\s*(?P<count>\d+)\s*(?:/|\bper\b)\s*(?:(?P<every>\d+)\s*)?(?P<unit>[A-Za-z]+)\s*",
    re.IGNORECASE,
)
_RATE_EXAMPLES: Final = "e.g. '100/minute', '10 per second' or '100/5 minutes'"

# Rule names appear in URLs (PATCH /v1/buckets/{name}) and in the quoted
# RateLimit-Policy header, so they stay within a conservative alphabet.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")
_NAME_TRIM: Final = "-_:./ "

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_HEADER = re.compile(r"\.Request\.Header\.([!#$%&'*+\-.^_`|~0-9A-Za-z]+)")
_QUERY = re.compile(r"\.Request\.Query\.([^\s{}]+)")
_CLIENT_IP: Final = ".Request.ClientIP"
_PLACEHOLDER_FORMS: Final = (
    "{{ .Request.Header.NAME }}, {{ .Request.Query.NAME }} or {{ .Request.ClientIP }}"
)
_HASH_FILTER: Final = "sha256"
HASH_HEX_CHARS: Final = 32
"""``{{ … | sha256 }}`` puts the first 32 hex digits (128 bits) of the value's
SHA-256 in the key instead of the value (docs/security.md)."""


def hashed_value(value: str) -> str:
    """What ``| sha256`` puts in a key for ``value``."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_HEX_CHARS]


QUALIFIER: Final = "%@"
"""Joins a key to the name of the rule it belongs to when another rule's template
claims the key's text (``first_match``, ``own_key``). No rendered or escaped text
holds it: values carry ``%`` only as ``%XX`` escapes and literal text holds no ``%``."""


def escaper(characters: str) -> Callable[[str], str]:
    """A function that percent-escapes ``%`` and ``characters`` in a value (their
    UTF-8 bytes, ``%XX`` in upper-case hex); any other character is kept as it is,
    so the result is injective and a plain value reads as it is."""
    table = {
        ord(c): "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in dict.fromkeys("%" + characters)
    }
    if len(table) == 1:

        def escape_percent(value: str) -> str:
            return value.replace("%", "%25") if "%" in value else value

        return escape_percent

    def escape(value: str) -> str:
        return value.translate(table)

    return escape


class RuleError(ValueError):
    """An invalid rule field: ``field`` (as ``Rule`` spells it: ``refill_rate``, or
    ``key`` for a template, ``rate`` for the rate shorthand) and ``problem``.

    ``str()`` reads ``"<field> <problem>"``, or ``message`` when given (a template
    or rate error, whose problem is a sentence of its own).
    """

    def __init__(self, field: str, problem: str, message: str | None = None) -> None:
        super().__init__(f"{field} {problem}" if message is None else message)
        self.field = field
        self.problem = problem


def _standalone(field: str, problem: str) -> RuleError:
    return RuleError(field, problem, problem)


# Rule spells its fields in snake_case; the limits validator uses the user-facing names.
_RULE_FIELDS: Final[Mapping[str, str]] = {"refillRate": "refill_rate"}


def parse_rate(text: str) -> tuple[int, float]:
    """``"100/minute"`` → ``(100, 100/60)``: the capacity and the refill in tokens per second.

    Accepts ``N/unit``, ``N per unit`` and ``N/M units`` (``"100/5 minutes"`` is a
    capacity of 100 refilled over 300 s); units are second, minute, hour and day,
    singular or plural, or s/sec, m/min, h/hr, d. Raises RuleError (a ValueError)
    with field ``rate`` and the sentence as ``str()``. The result is not range-checked:
    ``check_limits`` (or ``Rule``) does that.
    """
    match = _RATE.fullmatch(text)
    if match is None:
        raise _standalone("rate", f"invalid rate {text!r}: expected {_RATE_EXAMPLES}")
    unit = match["unit"].lower()
    seconds = _UNIT_SECONDS.get(unit)
    if seconds is None:
        raise _standalone(
            "rate",
            f"invalid rate {text!r}: unknown unit {match['unit']!r}; "
            "use second, minute, hour or day",
        )
    count = int(match["count"])
    every = int(match["every"]) if match["every"] is not None else 1
    if count < 1:
        raise _standalone("rate", f"invalid rate {text!r}: the count must be at least 1")
    if every < 1:
        singular = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}[seconds]
        raise _standalone(
            "rate", f"invalid rate {text!r}: the period must be at least 1 {singular}"
        )
    return count, count / (every * seconds)


def _sanitized_name(text: str) -> str:
    """``text`` as a rule name: disallowed characters become ``-``, ends trimmed."""
    name = re.sub(r"[^A-Za-z0-9_.:-]+", "-", text).strip(_NAME_TRIM)
    return name[:128].rstrip(_NAME_TRIM)


class _Lookup(msgspec.Struct, frozen=True):
    """One placeholder: where its value comes from and under which name."""

    source: str  # "header" | "query" | "client_ip"
    name: str  # header names lower-cased; query names as written
    display: str  # as written in the template, for messages
    hashed: bool = False  # ``| sha256``: the key holds a hash of the value, not the value


class Missing(msgspec.Struct, frozen=True):
    """What keeps a template from rendering a key, as data (``KeyTemplate.missing``).

    ``fields`` are the absent or empty headers and query parameters, each named as
    the template writes it (``X-API-Key``, ``user``), in template order; ``field``
    is the first of them, or None when none is (nothing missing, or only the
    client IP unknown). ``detail`` is the sentence, e.g. ``header X-API-Key is
    missing and client IP is unknown`` (empty when nothing is missing), which is
    also ``str()``. False when nothing is missing.
    """

    fields: tuple[str, ...] = ()
    detail: str = ""

    @property
    def field(self) -> str | None:
        return self.fields[0] if self.fields else None

    def __bool__(self) -> bool:
        return bool(self.detail)

    def __str__(self) -> str:
        return self.detail


class RenderFn(Protocol):
    """``render(headers, query, client_ip)``: the bucket key, or None."""

    def __call__(
        self, headers: Mapping[str, str], query: Mapping[str, str], client_ip: str
    ) -> str | None: ...


def _parse_template(text: str) -> list[str | _Lookup]:
    parts: list[str | _Lookup] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        parts.append(text[position : match.start()])
        parts.append(_parse_placeholder(match.group(0), match.group(1).strip(), text))
        position = match.end()
    parts.append(text[position:])
    for index, literal in enumerate(parts):
        if not isinstance(literal, str):
            continue
        if "{{" in literal or "}}" in literal:
            brace = "{{" if "{{" in literal else "}}"
            raise _standalone("key", f"unbalanced {brace!r} in key template {text!r}")
        if "%" in literal:
            raise _standalone(
                "key",
                f"'%' in the literal text of key template {text!r}: bucket keys use it "
                "to escape substituted values",
            )
        if not literal and 0 < index < len(parts) - 1:
            raise _standalone(
                "key",
                f"placeholders in key template {text!r} must be separated by literal text "
                "(e.g. '-' or ':'), or two values could spell the same key",
            )
    return [part for part in parts if part != ""]


def _parse_placeholder(whole: str, inner: str, text: str) -> _Lookup:
    source, bar, last = inner.rpartition("|")
    if bar and last.strip() == _HASH_FILTER:
        lookup = _parse_placeholder(whole, source.strip(), text)
        return msgspec.structs.replace(lookup, hashed=True)
    if bar and source.endswith((" ", "\t")):
        raise _standalone(
            "key",
            f"unknown filter {last.strip()!r} in {whole} of key template {text!r}; "
            f"the one filter is {_HASH_FILTER} ({{{{ .Request.Header.X-API-Key | sha256 }}}})",
        )
    if inner == _CLIENT_IP:
        return _Lookup("client_ip", "", "client IP")
    header = _HEADER.fullmatch(inner)
    if header is not None:
        return _Lookup("header", header[1].lower(), header[1])
    query = _QUERY.fullmatch(inner)
    if query is not None:
        return _Lookup("query", query[1], query[1])
    hint = _placeholder_hint(inner)
    raise _standalone(
        "key",
        f"unknown placeholder {whole} in key template {text!r}; use {_PLACEHOLDER_FORMS}"
        + (f" (did you mean {hint}?)" if hint else ""),
    )


def _placeholder_hint(inner: str) -> str:
    """The placeholder a near miss (wrong case, plural, missing dot) probably meant."""
    folded = inner.lstrip(".").lower()
    for prefix, form in (
        ("request.headers.", "Header"),
        ("request.header.", "Header"),
        ("request.query.", "Query"),
    ):
        if folded.startswith(prefix) and len(folded) > len(prefix):
            name = inner.lstrip(".")[len(prefix) :]
            return f"{{{{ .Request.{form}.{name} }}}}"
    if folded.replace("_", "") in ("request.clientip", "request.remoteaddr", "clientip"):
        return "{{ .Request.ClientIP }}"
    return ""


def _separators(parts: list[str | _Lookup]) -> str:
    """The first character of each literal text between two placeholders: what a value
    must not hold raw for the template to be injective."""
    return "".join(
        part[0]
        for before, part, after in zip(parts, parts[1:], parts[2:], strict=False)
        if isinstance(part, str) and isinstance(before, _Lookup) and isinstance(after, _Lookup)
    )


def _compile(parts: list[str | _Lookup]) -> RenderFn:
    """A render function specialised for the common shapes of template. Every value is
    escaped (``escaper``): ``%``, and with several placeholders the separators."""
    lookups = [part for part in parts if isinstance(part, _Lookup)]
    hashed = any(lookup.hashed for lookup in lookups)
    if not lookups:
        constant = "".join(part for part in parts if isinstance(part, str))

        def render_constant(
            headers: Mapping[str, str], query: Mapping[str, str], client_ip: str
        ) -> str | None:
            return constant

        return render_constant

    if len(lookups) == 1 and not hashed:
        index = parts.index(lookups[0])
        prefix = "".join(p for p in parts[:index] if isinstance(p, str))
        suffix = "".join(p for p in parts[index + 1 :] if isinstance(p, str))
        return _compile_single(lookups[0], prefix, suffix)

    escape = escaper(_separators(parts))

    def render_general(
        headers: Mapping[str, str], query: Mapping[str, str], client_ip: str
    ) -> str | None:
        pieces: list[str] = []
        for part in parts:
            if isinstance(part, str):
                pieces.append(part)
                continue
            value = _value_of(part, headers, query, client_ip)
            if not value:
                return None
            pieces.append(escape(value))
        return "".join(pieces)

    return render_general


def _compile_single(lookup: _Lookup, prefix: str, suffix: str) -> RenderFn:
    # One value between fixed text is injective as it is; ``%`` is escaped all the same
    # so that no rendered key holds QUALIFIER. Hot path: ``in`` before ``replace``.
    name = lookup.name
    if lookup.source == "client_ip":

        def render_client_ip(
            headers: Mapping[str, str], query: Mapping[str, str], client_ip: str
        ) -> str | None:
            if not client_ip:
                return None
            if "%" in client_ip:
                client_ip = client_ip.replace("%", "%25")
            return prefix + client_ip + suffix

        return render_client_ip

    from_query = lookup.source == "query"
    if suffix:

        def render_affixed(
            headers: Mapping[str, str], query: Mapping[str, str], client_ip: str
        ) -> str | None:
            value = (query if from_query else headers).get(name)
            if not value:
                return None
            if "%" in value:
                value = value.replace("%", "%25")
            return prefix + value + suffix

        return render_affixed

    def render_prefixed(
        headers: Mapping[str, str], query: Mapping[str, str], client_ip: str
    ) -> str | None:
        value = (query if from_query else headers).get(name)
        if not value:
            return None
        if "%" in value:
            value = value.replace("%", "%25")
        return prefix + value

    return render_prefixed


def _value_of(
    lookup: _Lookup, headers: Mapping[str, str], query: Mapping[str, str], client_ip: str
) -> str | None:
    if lookup.source == "header":
        value = headers.get(lookup.name)
    elif lookup.source == "query":
        value = query.get(lookup.name)
    else:
        value = client_ip
    if lookup.hashed and value:
        return hashed_value(value)
    return value


class KeyTemplate:
    """A parsed bucket-key template such as ``agent-api-key-{{ .Request.Header.X-API-Key }}``.

    ``render(headers, query, client_ip)`` gives the bucket key, or None when a
    referenced header, query parameter or the client IP is missing or empty. Values
    are percent-escaped so that the template is injective (see the module docstring):
    ``%`` always, and the first character of each literal text between two
    placeholders; two placeholders with no literal text between them, and a ``%`` in
    literal text, are refused.
    ``headers`` must have lower-cased names (header names match case-insensitively);
    query parameter names match exactly. Raises RuleError (a ValueError, field
    ``key``) for an unknown or malformed placeholder.
    """

    __slots__ = ("_lookups", "_pattern", "literal_prefix", "render", "text")

    render: RenderFn
    text: str
    literal_prefix: str
    """The literal text before the first placeholder (all of it if there is none)."""

    def __init__(self, text: str) -> None:
        if not text:
            raise _standalone("key", "key template is empty")
        parts = _parse_template(text)
        self.text = text
        self._lookups: tuple[_Lookup, ...] = tuple(
            part for part in parts if isinstance(part, _Lookup)
        )
        first = next((i for i, part in enumerate(parts) if isinstance(part, _Lookup)), len(parts))
        self.literal_prefix = "".join(p for p in parts[:first] if isinstance(p, str))
        self._pattern = re.compile(
            "".join(re.escape(p) if isinstance(p, str) else "(?:.+?)" for p in parts),
            re.DOTALL,
        )
        self.render = _compile(parts)

    @property
    def default_name(self) -> str:
        """A rule name from the literal prefix: ``agent-api-key-{{…}}`` → ``agent-api-key``.

        Trailing ``-_:./`` and spaces are stripped and characters a rule name may
        not hold become ``-``; empty when the template starts with a placeholder.
        """
        return _sanitized_name(self.literal_prefix)

    @property
    def shown_name(self) -> str:
        """The literal prefix as written, ends trimmed as in ``default_name`` but not
        made ASCII: ``agent\u2011api\u2011key-{{…}}`` → ``agent\u2011api\u2011key``
        (what a reader of the template calls the rule)."""
        return self.literal_prefix.strip(_NAME_TRIM)

    @property
    def header_names(self) -> tuple[str, ...]:
        """Lower-cased names of the headers the template reads."""
        return tuple(lk.name for lk in self._lookups if lk.source == "header")

    @property
    def raw_header_names(self) -> tuple[str, ...]:
        """Lower-cased names of the headers whose values the key holds as they are
        (not through ``| sha256``)."""
        return tuple(lk.name for lk in self._lookups if lk.source == "header" and not lk.hashed)

    @property
    def query_names(self) -> tuple[str, ...]:
        """Names of the query parameters the template reads."""
        return tuple(lk.name for lk in self._lookups if lk.source == "query")

    @property
    def uses_client_ip(self) -> bool:
        return any(lk.source == "client_ip" for lk in self._lookups)

    def missing(
        self, headers: Mapping[str, str], query: Mapping[str, str], client_ip: str
    ) -> Missing:
        """What stops ``render`` from producing a key: ``.field`` names the first absent
        header or query parameter as written in the template (``X-API-Key``),
        ``.detail`` says it in words (``header X-API-Key is missing``). False when
        nothing is missing.
        """
        fields: list[str] = []
        problems: list[str] = []
        for lookup in dict.fromkeys(self._lookups):
            value = _value_of(lookup, headers, query, client_ip)
            if lookup.source == "client_ip":
                if not value:
                    problems.append("client IP is unknown")
                continue
            if value:
                continue
            what = "header" if lookup.source == "header" else "query parameter"
            fields.append(lookup.display)
            problems.append(f"{what} {lookup.display} is {'missing' if value is None else 'empty'}")
        return Missing(tuple(fields), " and ".join(problems))

    def matches(self, key: str) -> bool:
        """Whether ``render`` could have produced ``key`` (a key holding QUALIFIER
        never: it belongs to the rule it names)."""
        return self._pattern.fullmatch(key) is not None and QUALIFIER not in key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyTemplate) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"KeyTemplate({self.text!r})"


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """One bucket rule: which requests share a bucket and how the bucket behaves.

    ``refill_rate`` is in tokens per second; ``ttl`` is how long (seconds) a full,
    idle bucket is kept; ``mode`` is shared (one bucket across regions), strict
    (each region holds a share) or local (per region, not replicated);
    ``on_store_failure`` says what to decide when the state store is unreachable;
    ``shadow`` makes the rule's refusals advisory (see ``Shadows``).
    Construction validates (the limits with ``core.limits.check_limits``, the same
    check config loading and the runtime PATCH make) and raises RuleError (a
    ValueError) naming the field as Rule spells it (``refill_rate``);
    ``Rule.create`` builds the template from the key text.
    """

    name: str
    key: str
    template: KeyTemplate
    capacity: int
    refill_rate: float
    ttl: float = DEFAULT_TTL
    mode: str = SHARED
    on_store_failure: str = "local"
    shadow: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _NAME.fullmatch(self.name) is None:
            raise RuleError(
                "name",
                "must be 1-128 letters, digits, '_', '-', '.' or ':' "
                f"starting with a letter, digit or '_', got {self.name!r}",
            )
        if self.template.text != self.key:
            raise RuleError("key", f"is {self.key!r} but the template is {self.template.text!r}")
        try:
            check_limits(
                capacity=self.capacity, refill_rate=self.refill_rate, ttl=self.ttl, mode=self.mode
            )
        except LimitError as error:
            raise RuleError(_RULE_FIELDS.get(error.field, error.field), error.problem) from None
        if self.on_store_failure not in STORE_FAILURE_POLICIES:
            raise RuleError(
                "on_store_failure", f"must be allow, deny or local, got {self.on_store_failure!r}"
            )

    @classmethod
    def create(
        cls,
        key: str,
        capacity: int,
        refill_rate: float,
        *,
        name: str | None = None,
        ttl: float = DEFAULT_TTL,
        mode: str = SHARED,
        on_store_failure: str = "local",
        shadow: bool = False,
    ) -> Rule:
        """A validated rule; ``name`` defaults to the template's ``default_name`` (or "rule").

        Raises RuleError, whose ``field`` is ``key`` for a malformed template.
        """
        template = KeyTemplate(key)
        return cls(
            name=(template.default_name or "rule") if name is None else name,
            key=key,
            template=template,
            capacity=capacity,
            refill_rate=_as_float("refill_rate", refill_rate),
            ttl=_as_float("ttl", ttl),
            mode=mode,
            on_store_failure=on_store_failure,
            shadow=shadow,
        )

    def with_changes(
        self,
        *,
        capacity: int | None = None,
        refill_rate: float | None = None,
        ttl: float | None = None,
        mode: str | None = None,
        on_store_failure: str | None = None,
    ) -> Rule:
        """A validated copy with the given limits changed (None keeps the current value)."""
        if refill_rate is not None:
            refill_rate = _as_float("refill_rate", refill_rate)
        if ttl is not None:
            ttl = _as_float("ttl", ttl)
        policy = self.on_store_failure if on_store_failure is None else on_store_failure
        return Rule(
            name=self.name,
            key=self.key,
            template=self.template,
            capacity=self.capacity if capacity is None else capacity,
            refill_rate=self.refill_rate if refill_rate is None else refill_rate,
            ttl=self.ttl if ttl is None else ttl,
            mode=self.mode if mode is None else mode,
            on_store_failure=policy,
            shadow=self.shadow,
        )

    @property
    def window(self) -> float:
        """Seconds for an empty bucket to refill completely (the RateLimit-Policy ``w``)."""
        return self.capacity / self.refill_rate


def _as_float(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RuleError(field, f"must be a number, got {value!r}")
    return float(value)


def _claims(template: KeyTemplate, key: str) -> bool:
    """Whether ``template`` could have produced ``key`` (its literal prefix first: cheap)."""
    return key.startswith(template.literal_prefix) and template.matches(key)


def first_match(
    rules: Sequence[Rule], headers: Mapping[str, str], query: Mapping[str, str], client_ip: str
) -> tuple[str, str] | None:
    """The bucket key of the first rule whose template this request satisfies, and that
    rule's name; None when none does.

    The key is the rendered one when no earlier rule's template could have produced
    that text (then it is the key's rule for ``Limiter.rule_for`` too), else the
    rendered one + QUALIFIER + the rule's name: two rules never share a bucket.
    """
    index = 0  # hot path: no enumerate, no work past the first rule
    for rule in rules:
        key = rule.template.render(headers, query, client_ip)
        if key is not None:
            if index:
                for earlier in rules[:index]:
                    template = earlier.template
                    if key.startswith(template.literal_prefix) and template.matches(key):
                        return key + QUALIFIER + rule.name, rule.name
            return key, rule.name
        index += 1  # noqa: SIM113 - enumerate costs more on the hot path
    return None


_escape_domain = escaper(":")
_escape_entry = escaper(",=")


def descriptor_key(domain: str, entries: Sequence[tuple[str, str]]) -> str:
    """The bucket text of one Envoy descriptor: ``domain:k1=v1,k2=v2``, injective:
    ``%`` and the separators are percent-escaped where they occur in the parts."""
    return (
        _escape_domain(domain)
        + ":"
        + ",".join(f"{_escape_entry(k)}={_escape_entry(v)}" for k, v in entries)
    )


def descriptor_rule_names(domain: str, keys: Sequence[str]) -> tuple[str, str]:
    """The rule names that give a descriptor its limits, most specific first:
    ``<domain>.<k1>.<k2>`` (its entry keys), then ``<domain>``."""
    return domain + "." + ".".join(keys), domain


def _descriptor_owner(key: str, rules_by_name: Mapping[str, Rule]) -> str | None:
    """The rule an Envoy descriptor's bucket text ``key`` would be decided under (the
    inverse of ``descriptor_key``), or None when ``key`` is no descriptor's text or no
    rule names its descriptor."""
    domain, colon, rest = key.partition(":")
    if not colon or not domain or not rest:
        return None
    keys = []
    for entry in rest.split(","):
        name, equals, value = entry.partition("=")
        if not equals or not name or "=" in value:
            return None
        keys.append(unquote(name, errors="surrogateescape"))
    for candidate in descriptor_rule_names(unquote(domain, errors="surrogateescape"), keys):
        if candidate in rules_by_name:
            return candidate
    return None


def owner_of(rules: Sequence[Rule], rules_by_name: Mapping[str, Rule], key: str) -> str | None:
    """The rule that owns the text ``key``, or None when none does: the rule a
    ``%@<rule>`` suffix names (``QUALIFIER``), else the first rule whose template could
    have produced it, else the rule an Envoy descriptor of that text is decided under
    (``descriptor_key``). A request that names another rule for ``key`` is decided on
    its own bucket (``key_of_rule``), never on the owner's."""
    if QUALIFIER in key:
        named = key.rpartition(QUALIFIER)[2]
        if named in rules_by_name:
            return named
    return _template_owner(rules, key) or _descriptor_owner(key, rules_by_name)


def _template_owner(rules: Sequence[Rule], key: str) -> str | None:
    """The first rule whose template could have produced ``key``, or None."""
    for rule in rules:
        if _claims(rule.template, key):
            return rule.name
    return None


def key_of_rule(
    rules: Sequence[Rule], rules_by_name: Mapping[str, Rule], key: str, rule: str
) -> str:
    """The bucket key of rule ``rule`` for a key given as text (the API's ``"key"``
    with ``"rule"``): ``key`` itself when no other rule owns that text (``owner_of``),
    else ``key`` + QUALIFIER + ``rule``: a caller naming a looser rule for a key the
    config gives to a stricter one (a template's, an Envoy descriptor's) gets a bucket
    of its own, never the owner's under other limits."""
    owner = owner_of(rules, rules_by_name, key)
    return key if owner is None or owner == rule else key + QUALIFIER + rule


def own_key(rules: Sequence[Rule], key: str, rule: str) -> str:
    """``key`` as the bucket key of rule ``rule`` when the key was built elsewhere (an
    Envoy descriptor): as it is, unless the template of another rule could have
    produced it (the first such rule owns that text), then key + QUALIFIER + ``rule``.
    ``key`` must hold no QUALIFIER (escape ``%`` in what it is built from)."""
    owner = _template_owner(rules, key)
    return key if owner is None or owner == rule else key + QUALIFIER + rule


class Shadows:
    """Which decisions are advisory ("shadow mode"): those of a rule marked
    ``shadow: true`` in the file or by PATCH, and those of a key PATCHed so.

    A shadowed decision is computed, charged and counted as any other, but the
    request is let through and told it would have been refused (docs/api.md,
    "Shadow mode"): how a new limit is rolled out (Envoy ratelimit's
    ``shadow_mode``, nginx's ``limit_req_dry_run``). Empty, it is false, so a
    front door checks ``if shadows and shadows.covers(...)`` only on a refusal.

    With ``source`` (a decider's ``shadowed(rule, key)``) the marks are read from
    the replicated configs (``BucketConfig.shadow``, set by PATCH in any region and
    kept in the WAL and snapshots); it is then always true, and ``covers`` asks the
    source (two dictionary lookups, on a refusal only). Without one, the marks are
    the file's rules and those ``mark`` sets here (an embedded limiter's own).
    """

    __slots__ = ("keys", "rules", "source")

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        source: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.rules: set[str] = {rule.name for rule in rules if rule.shadow}
        self.keys: set[str] = set()
        self.source = source

    def __bool__(self) -> bool:
        return self.source is not None or bool(self.rules) or bool(self.keys)

    def covers(self, rule: str, key: str) -> bool:
        """Whether a decision of ``key`` under ``rule`` is advisory."""
        if self.source is not None:
            return self.source(rule, key)
        return rule in self.rules or key in self.keys

    def mark(self, name: str, on: bool, *, rule: bool) -> bool:
        """Mark rule (or key) ``name`` shadow or not here; whether it was before (a
        set with a ``source`` reads the configs instead: PATCH changes those)."""
        names = self.rules if rule else self.keys
        was = name in names
        if on:
            names.add(name)
        else:
            names.discard(name)
        return was

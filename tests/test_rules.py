"""Bucket rules: the rate shorthand, key templates and rule validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bucketmesh.core.rules import KeyTemplate, Rule, RuleError, first_match, parse_rate

AGENT = "agent-api-key-{{ .Request.Header.X-API-Key }}"
PER_IP = "ip-{{ .Request.ClientIP }}"

# -- parse_rate ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "capacity", "refill"),
    [
        ("10/second", 10, 10.0),
        ("100/minute", 100, 100 / 60),
        ("1000/day", 1000, 1000 / 86400),
        ("100 per minute", 100, 100 / 60),
        ("5/hour", 5, 5 / 3600),
        ("10/2 seconds", 10, 5.0),
        ("100/5 minutes", 100, 100 / 300),
        ("100 per 5 minutes", 100, 100 / 300),
        ("7/s", 7, 7.0),
        ("7/sec", 7, 7.0),
        ("7/seconds", 7, 7.0),
        ("60/m", 60, 1.0),
        ("60/min", 60, 1.0),
        ("60/minutes", 60, 1.0),
        ("3600/h", 3600, 1.0),
        ("3600/hours", 3600, 1.0),
        ("86400/d", 86400, 1.0),
        ("86400/days", 86400, 1.0),
        ("10 / Minute", 10, 10 / 60),
        ("  10/MINUTE  ", 10, 10 / 60),
        ("10/2seconds", 10, 5.0),
    ],
)
def test_rate_shorthand_gives_capacity_and_refill_per_second(
    text: str, capacity: int, refill: float
) -> None:
    got_capacity, got_refill = parse_rate(text)
    assert got_capacity == capacity
    assert got_refill == pytest.approx(refill, rel=1e-12)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid rate '': expected e.g. '100/minute', '10 per second' or '100/5 minutes'"),
        ("100", "invalid rate '100': expected e.g."),
        ("abc/minute", "invalid rate 'abc/minute': expected e.g."),
        ("1.5/second", "invalid rate '1.5/second': expected e.g."),
        ("-5/second", "invalid rate '-5/second': expected e.g."),
        ("100 minute", "invalid rate '100 minute': expected e.g."),
        ("100//minute", "invalid rate '100//minute': expected e.g."),
        (
            "100/fortnight",
            "invalid rate '100/fortnight': unknown unit 'fortnight'; "
            "use second, minute, hour or day",
        ),
        ("0/second", "invalid rate '0/second': the count must be at least 1"),
        ("100/0 minutes", "invalid rate '100/0 minutes': the period must be at least 1 minute"),
    ],
)
def test_malformed_rate_names_the_text(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_rate(text)
    assert str(raised.value).startswith(message)


_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@given(
    count=st.integers(min_value=1, max_value=10**9),
    every=st.integers(min_value=1, max_value=1000),
    unit=st.sampled_from(sorted(_UNITS)),
    spelled=st.sampled_from(["{c}/{e} {u}s", "{c} per {e} {u}s", "{c}/{e}{u}"]),
)
def test_rate_refills_the_whole_capacity_over_the_period(
    count: int, every: int, unit: str, spelled: str
) -> None:
    capacity, refill = parse_rate(spelled.format(c=count, e=every, u=unit))
    assert capacity == count
    assert refill * every * _UNITS[unit] == pytest.approx(count, rel=1e-12)


# -- KeyTemplate: rendering ----------------------------------------------------


def test_header_template_renders_with_lowercased_header_names() -> None:
    template = KeyTemplate(AGENT)
    assert template.render({"x-api-key": "my-agent-key"}, {}, "10.0.0.1") == (
        "agent-api-key-my-agent-key"
    )
    assert template.header_names == ("x-api-key",)


def test_header_name_case_in_template_does_not_matter() -> None:
    for spelled in ("X-API-Key", "x-api-key", "X-Api-KEY"):
        template = KeyTemplate("k-{{ .Request.Header." + spelled + " }}")
        assert template.render({"x-api-key": "v"}, {}, "") == "k-v"


def test_missing_or_empty_header_renders_nothing() -> None:
    template = KeyTemplate(AGENT)
    assert template.render({}, {}, "10.0.0.1") is None
    assert template.render({"x-api-key": ""}, {}, "10.0.0.1") is None
    # The caller lower-cases names; a mixed-case name in the mapping is not found.
    assert template.render({"X-API-Key": "k"}, {}, "10.0.0.1") is None


def test_missing_names_the_header_as_written_in_the_template() -> None:
    template = KeyTemplate(AGENT)
    absent = template.missing({}, {}, "10.0.0.1")
    assert (absent.field, absent.detail, str(absent)) == (
        "X-API-Key",
        "header X-API-Key is missing",
        "header X-API-Key is missing",
    )
    assert absent
    empty = template.missing({"x-api-key": ""}, {}, "")
    assert (empty.field, empty.detail) == ("X-API-Key", "header X-API-Key is empty")
    present = template.missing({"x-api-key": "k"}, {}, "")
    assert (present.field, present.fields, present.detail, bool(present)) == (None, (), "", False)


def test_missing_lists_every_absent_value() -> None:
    template = KeyTemplate(
        "{{ .Request.Header.X-Tenant }}/{{ .Request.Query.user }}/{{ .Request.ClientIP }}"
    )
    absent = template.missing({}, {"user": ""}, "")
    assert absent.detail == (
        "header X-Tenant is missing and query parameter user is empty and client IP is unknown"
    )
    assert (absent.field, absent.fields) == ("X-Tenant", ("X-Tenant", "user"))
    assert not template.missing({"x-tenant": "t"}, {"user": "u"}, "1.2.3.4")
    only_query = template.missing({"x-tenant": "t"}, {}, "1.2.3.4")
    assert (only_query.field, only_query.detail) == ("user", "query parameter user is missing")


def test_query_names_match_exactly() -> None:
    template = KeyTemplate("small-{{ .Request.Query.user }}")
    assert template.render({}, {"user": "bob"}, "") == "small-bob"
    assert template.render({}, {"User": "bob"}, "") is None
    assert template.query_names == ("user",)
    assert template.missing({}, {}, "").detail == "query parameter user is missing"
    assert template.missing({}, {}, "").field == "user"


def test_client_ip_template() -> None:
    template = KeyTemplate(PER_IP)
    assert template.render({}, {}, "203.0.113.9") == "ip-203.0.113.9"
    assert template.render({}, {}, "") is None
    assert template.uses_client_ip
    unknown_ip = template.missing({}, {}, "")
    assert (unknown_ip.detail, unknown_ip.field) == ("client IP is unknown", None)


def test_whitespace_inside_braces_is_optional() -> None:
    for text in (
        "ip-{{.Request.ClientIP}}",
        "ip-{{ .Request.ClientIP }}",
        "ip-{{   .Request.ClientIP\t}}",
    ):
        assert KeyTemplate(text).render({}, {}, "1.1.1.1") == "ip-1.1.1.1"


def test_literal_suffix_and_several_placeholders() -> None:
    template = KeyTemplate("t:{{ .Request.Header.X-Tenant }}:u:{{ .Request.Query.user }}:end")
    assert template.render({"x-tenant": "acme"}, {"user": "bob"}, "") == "t:acme:u:bob:end"
    assert template.render({"x-tenant": "acme"}, {}, "") is None
    single = KeyTemplate("pre-{{ .Request.Query.q }}-post")
    assert single.render({}, {"q": "x"}, "") == "pre-x-post"


def test_template_without_placeholders_is_one_global_bucket() -> None:
    template = KeyTemplate("global")
    assert template.render({}, {}, "") == "global"
    assert template.literal_prefix == "global"
    assert template.matches("global")
    assert not template.matches("global2")


def test_render_takes_keyword_arguments() -> None:
    template = KeyTemplate(AGENT)
    assert template.render(headers={"x-api-key": "k"}, query={}, client_ip="") == (
        "agent-api-key-k"
    )


# -- KeyTemplate: malformed ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "key template is empty"),
        (
            "x-{{ .Request.Foo }}",
            "unknown placeholder {{ .Request.Foo }} in key template 'x-{{ .Request.Foo }}'; "
            "use {{ .Request.Header.NAME }}, {{ .Request.Query.NAME }} or {{ .Request.ClientIP }}",
        ),
        (
            "x-{{ .request.header.X-Key }}",
            "unknown placeholder {{ .request.header.X-Key }} in key template "
            "'x-{{ .request.header.X-Key }}'; use {{ .Request.Header.NAME }}, "
            "{{ .Request.Query.NAME }} or {{ .Request.ClientIP }} "
            "(did you mean {{ .Request.Header.X-Key }}?)",
        ),
        (
            "x-{{ .Request.Headers.X-Key }}",
            "unknown placeholder {{ .Request.Headers.X-Key }} in key template "
            "'x-{{ .Request.Headers.X-Key }}'; use {{ .Request.Header.NAME }}, "
            "{{ .Request.Query.NAME }} or {{ .Request.ClientIP }} "
            "(did you mean {{ .Request.Header.X-Key }}?)",
        ),
        (
            "{{ .Request.Client_IP }}",
            "unknown placeholder {{ .Request.Client_IP }} in key template "
            "'{{ .Request.Client_IP }}'; use {{ .Request.Header.NAME }}, "
            "{{ .Request.Query.NAME }} or {{ .Request.ClientIP }} "
            "(did you mean {{ .Request.ClientIP }}?)",
        ),
        (
            "x-{{ }}",
            "unknown placeholder {{ }} in key template 'x-{{ }}'; use {{ .Request.Header.NAME }}",
        ),
        (
            "x-{{ .Request.Header. }}",
            "unknown placeholder {{ .Request.Header. }} in key template",
        ),
        ("x-{{ .Request.ClientIP", "unbalanced '{{' in key template 'x-{{ .Request.ClientIP'"),
        ("x-.Request.ClientIP }}", "unbalanced '}}' in key template 'x-.Request.ClientIP }}'"),
    ],
)
def test_malformed_template_names_the_placeholder(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        KeyTemplate(text)
    assert str(raised.value).startswith(message)


# -- KeyTemplate: names and matching ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "prefix", "name"),
    [
        (AGENT, "agent-api-key-", "agent-api-key"),
        (PER_IP, "ip-", "ip"),
        ("{{ .Request.ClientIP }}", "", ""),
        ("api:v1:{{ .Request.ClientIP }}", "api:v1:", "api:v1"),
        ("tenant/{{ .Request.Header.X-Tenant }}", "tenant/", "tenant"),
        ("user key {{ .Request.Query.user }}", "user key ", "user-key"),
        ("k_{{ .Request.Query.a }}-{{ .Request.Query.b }}", "k_", "k"),
        ("global", "global", "global"),
    ],
)
def test_default_name_is_the_literal_prefix_trimmed(text: str, prefix: str, name: str) -> None:
    template = KeyTemplate(text)
    assert template.literal_prefix == prefix
    assert template.default_name == name


def test_matches_keys_the_template_could_render() -> None:
    template = KeyTemplate(AGENT)
    assert template.matches("agent-api-key-abc")
    assert template.matches("agent-api-key-a.b*c(d)")
    assert not template.matches("agent-api-key-")
    assert not template.matches("ip-10.0.0.1")
    assert not template.matches("xagent-api-key-abc")


def test_literal_text_is_not_a_regex() -> None:
    template = KeyTemplate("a.b+{{ .Request.ClientIP }}")
    assert template.matches("a.b+1.2.3.4")
    assert not template.matches("axbb1.2.3.4")


_literal = st.text(alphabet=st.characters(blacklist_characters="{}%"), max_size=12)
_value = st.text(min_size=1, max_size=20)


def _escaped(value: str, separators: str) -> str:
    """``value`` as the docs say a key carries it: ``%`` and the given characters
    percent-escaped (their UTF-8 bytes, upper-case hex)."""
    return "".join(
        "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        if c == "%" or c in separators
        else c
        for c in value
    )


@given(prefix=_literal, middle=_literal.filter(bool), suffix=_literal, header=_value, user=_value)
def test_every_rendered_key_matches_its_template(
    prefix: str, middle: str, suffix: str, header: str, user: str
) -> None:
    template = KeyTemplate(
        f"{prefix}{{{{ .Request.Header.X-Key }}}}{middle}{{{{ .Request.Query.user }}}}{suffix}"
    )
    key = template.render({"x-key": header}, {"user": user}, "")
    separator = middle[0]
    assert key == (
        f"{prefix}{_escaped(header, separator)}{middle}{_escaped(user, separator)}{suffix}"
    )
    assert template.matches(key)


@given(prefix=_literal, value=_value)
def test_single_placeholder_round_trip(prefix: str, value: str) -> None:
    template = KeyTemplate(prefix + "{{ .Request.ClientIP }}")
    key = template.render({}, {}, value)
    assert key == prefix + value.replace("%", "%25")
    assert template.matches(key)
    assert not template.matches(prefix)


# -- KeyTemplate: keys are injective ----------------------------------------------------


def test_a_plain_value_renders_as_it_is() -> None:
    assert KeyTemplate(AGENT).render({"x-api-key": "my-agent-key"}, {}, "") == (
        "agent-api-key-my-agent-key"
    )
    assert KeyTemplate(PER_IP).render({}, {}, "2001:db8::1") == "ip-2001:db8::1"
    uuid = "550e8400-e29b-41d4-a716-446655440000"
    assert KeyTemplate(AGENT).render({"x-api-key": uuid}, {}, "") == f"agent-api-key-{uuid}"


def test_a_percent_sign_in_a_value_is_always_escaped() -> None:
    assert KeyTemplate(AGENT).render({"x-api-key": "50%off"}, {}, "") == "agent-api-key-50%25off"


def test_the_separator_between_two_placeholders_is_escaped_in_values() -> None:
    template = KeyTemplate("t:{{ .Request.Header.X-Tenant }}:u:{{ .Request.Query.user }}:end")
    assert template.render({"x-tenant": "a:b"}, {"user": "c:d"}, "") == "t:a%3Ab:u:c%3Ad:end"
    # only the separator's first character: the rest of it stays readable
    assert template.render({"x-tenant": "u"}, {"user": "b-b"}, "") == "t:u:u:b-b:end"
    pair = KeyTemplate("k-{{ .Request.Header.X }}-{{ .Request.Header.Y }}")
    one = pair.render({"x": "a-b", "y": "c"}, {}, "")
    other = pair.render({"x": "a", "y": "b-c"}, {}, "")
    assert (one, other) == ("k-a%2Db-c", "k-a-b%2Dc")


@pytest.mark.parametrize(
    "text",
    [
        "k-{{ .Request.Header.X }}{{ .Request.Header.Y }}",
        "{{ .Request.ClientIP }}{{ .Request.Query.q }}-end",
    ],
)
def test_adjacent_placeholders_are_refused(text: str) -> None:
    with pytest.raises(RuleError) as raised:
        KeyTemplate(text)
    assert raised.value.field == "key"
    assert "must be separated by literal text" in str(raised.value)


def test_a_percent_sign_in_literal_text_is_refused() -> None:
    with pytest.raises(RuleError) as raised:
        KeyTemplate("50%-{{ .Request.Header.X }}")
    assert raised.value.field == "key"
    assert "'%'" in str(raised.value)


_fragment = st.text(alphabet="k-:a", max_size=3)
_tricky = st.text(alphabet="ab-:%2A@", min_size=1, max_size=5)


@given(
    prefix=_fragment,
    middle=_fragment.filter(bool),
    suffix=_fragment,
    parts=st.tuples(_tricky, _tricky, _tricky),
    other=st.tuples(_tricky, _tricky),
)
def test_different_values_never_render_one_key(
    prefix: str,
    middle: str,
    suffix: str,
    parts: tuple[str, str, str],
    other: tuple[str, str],
) -> None:
    template = KeyTemplate(
        f"{prefix}{{{{ .Request.Header.X }}}}{middle}{{{{ .Request.Header.Y }}}}{suffix}"
    )
    a, b, c = parts
    # the separator moved from one value into the other: one text, two value pairs
    candidates = [(a + middle + b, c), (a, b + middle + c), other]
    keys = {pair: template.render({"x": pair[0], "y": pair[1]}, {}, "") for pair in candidates}
    assert len(set(keys.values())) == len(keys), keys


@st.composite
def _rule_sets(draw: st.DrawFn) -> list[Rule]:
    """2-4 rules whose literal text overlaps: one or two header placeholders each."""
    texts: list[str] = []
    for _ in range(draw(st.integers(2, 4))):
        text = draw(_fragment) + "{{ .Request.Header." + draw(st.sampled_from("XY")) + " }}"
        if draw(st.booleans()):
            text += draw(_fragment.filter(bool)) + "{{ .Request.Header.Z }}"
        texts.append(text + draw(_fragment))
    unique = list(dict.fromkeys(texts))  # config refuses two rules with one template
    return [Rule.create(text, 1, 1.0, name=f"r{n}") for n, text in enumerate(unique)]


_requests = st.lists(
    st.fixed_dictionaries({}, optional={"x": _tricky, "y": _tricky, "z": _tricky}),
    min_size=1,
    max_size=12,
)


@given(rules=_rule_sets(), requests=_requests)
def test_two_rules_never_share_a_key_and_a_key_names_its_rule(
    rules: list[Rule], requests: list[dict[str, str]]
) -> None:
    """Whatever the requests carry, a bucket key stands for one rule and one set of
    values; and a key used as it is is the one whose rule the API would find for it
    (the first rule whose template matches), while any other carries its rule's name."""
    by_name = {rule.name: rule for rule in rules}
    seen: dict[str, tuple[str, tuple[str, ...]]] = {}
    for headers in requests:
        found = first_match(rules, headers, {}, "")
        if found is None:
            continue
        key, name = found
        used = tuple(headers[h] for h in by_name[name].template.header_names)
        assert seen.setdefault(key, (name, used)) == (name, used), (key, seen[key], name, used)
        owner = next(rule.name for rule in rules if rule.template.matches(key.split("%@")[0]))
        if key.endswith("%@" + name):
            assert owner != name
        else:
            assert owner == name


def test_templates_compare_by_text() -> None:
    assert KeyTemplate(AGENT) == KeyTemplate(AGENT)
    assert KeyTemplate(AGENT) != KeyTemplate(PER_IP)
    assert len({KeyTemplate(AGENT), KeyTemplate(AGENT)}) == 1
    assert repr(KeyTemplate(PER_IP)) == "KeyTemplate('ip-{{ .Request.ClientIP }}')"


# -- Rule -------------------------------------------------------------------------


def test_create_builds_a_rule_named_after_its_key() -> None:
    rule = Rule.create(AGENT, 5000, 50)
    assert rule.name == "agent-api-key"
    assert rule.key == AGENT
    assert rule.template == KeyTemplate(AGENT)
    assert rule.capacity == 5000
    assert rule.refill_rate == 50.0
    assert isinstance(rule.refill_rate, float)
    assert rule.ttl == 3600.0
    assert rule.mode == "shared"
    assert rule.on_store_failure == "local"
    assert rule.window == 100.0


def test_create_takes_name_ttl_mode_and_store_failure_policy() -> None:
    rule = Rule.create(
        PER_IP, 100, 100 / 60, name="per-ip", ttl=60, mode="strict", on_store_failure="deny"
    )
    assert (rule.name, rule.ttl, rule.mode, rule.on_store_failure) == (
        "per-ip",
        60.0,
        "strict",
        "deny",
    )


def test_create_without_a_literal_prefix_falls_back_to_rule() -> None:
    assert Rule.create("{{ .Request.ClientIP }}", 1, 1).name == "rule"


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"capacity": 0}, "capacity", "capacity must be >= 1, got 0"),
        ({"capacity": -3}, "capacity", "capacity must be >= 1, got -3"),
        ({"capacity": 1.5}, "capacity", "capacity must be an integer, got 1.5"),
        ({"capacity": True}, "capacity", "capacity must be an integer, got True"),
        ({"refill_rate": 0}, "refill_rate", "refill_rate must be > 0, got 0.0"),
        ({"refill_rate": -5}, "refill_rate", "refill_rate must be > 0, got -5.0"),
        ({"refill_rate": math.nan}, "refill_rate", "refill_rate must be > 0, got nan"),
        ({"refill_rate": math.inf}, "refill_rate", "refill_rate must be finite, got inf"),
        ({"refill_rate": "5"}, "refill_rate", "refill_rate must be a number, got '5'"),
        ({"ttl": 0}, "ttl", "ttl must be > 0, got 0.0"),
        ({"mode": "fast"}, "mode", "mode must be shared, strict or local, got 'fast'"),
        (
            {"on_store_failure": "maybe"},
            "on_store_failure",
            "on_store_failure must be allow, deny or local, got 'maybe'",
        ),
        (
            {"name": "per ip"},
            "name",
            "name must be 1-128 letters, digits, '_', '-', '.' or ':' starting with a letter, "
            "digit or '_', got 'per ip'",
        ),
        ({"name": ""}, "name", "name must be 1-128 letters"),
    ],
)
def test_create_rejects_invalid_limits(kwargs: dict[str, object], field: str, message: str) -> None:
    arguments: dict[str, object] = {"key": AGENT, "capacity": 10, "refill_rate": 1.0, **kwargs}
    with pytest.raises(RuleError) as raised:
        Rule.create(**arguments)  # type: ignore[arg-type]
    assert raised.value.field == field
    assert str(raised.value).startswith(message)
    assert isinstance(raised.value, ValueError)


def test_create_rejects_a_bad_template() -> None:
    with pytest.raises(ValueError, match=r"unknown placeholder \{\{ \.Request\.Nope \}\}"):
        Rule.create("x-{{ .Request.Nope }}", 1, 1)


def test_rule_is_validated_however_it_is_built() -> None:
    with pytest.raises(RuleError, match="key is 'b' but the template is 'a'"):
        Rule(name="a", key="b", template=KeyTemplate("a"), capacity=1, refill_rate=1.0)
    with pytest.raises(RuleError, match="capacity must be >= 1, got 0"):
        Rule(name="a", key="a", template=KeyTemplate("a"), capacity=0, refill_rate=1.0)


def test_rules_are_frozen_and_compare_by_value() -> None:
    rule = Rule.create(AGENT, 5000, 50)
    assert rule == Rule.create(AGENT, 5000, 50.0)
    assert rule != Rule.create(AGENT, 5000, 51)
    with pytest.raises(AttributeError):
        rule.capacity = 1  # type: ignore[misc]


def test_with_changes_validates_and_keeps_the_rest() -> None:
    rule = Rule.create(AGENT, 5000, 50)
    changed = rule.with_changes(capacity=10, refill_rate=2)
    assert (changed.capacity, changed.refill_rate, changed.ttl, changed.name) == (
        10,
        2.0,
        3600.0,
        "agent-api-key",
    )
    assert rule.capacity == 5000
    assert rule.with_changes(mode="local", ttl=5).mode == "local"
    with pytest.raises(RuleError) as raised:
        rule.with_changes(refill_rate=-1)
    assert str(raised.value) == "refill_rate must be > 0, got -1.0"

"""core.limits: the one validator of bucket limits, its bounds, and where msgspec errors point."""

from __future__ import annotations

import contextlib
import math
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketmesh.core import bucket, rules
from bucketmesh.core.bucket import NS_PER_S, BucketConfig, interval_for
from bucketmesh.core.limiter import DeltaBatch, Limiter
from bucketmesh.core.limits import (
    INT64_MAX,
    MAX_CAPACITY,
    MAX_REFILL_RATE,
    MAX_SPAN_NS,
    MAX_TTL,
    MIN_CAPACITY,
    MIN_REFILL_RATE,
    MIN_TTL,
    MODES,
    LimitError,
    check_limits,
    check_tokens,
    error_location,
)
from bucketmesh.core.rules import Rule, RuleError
from bucketmesh.node.config import ConfigError, parse_config

# -- the bounds ------------------------------------------------------------------


def test_bounds_keep_every_span_of_the_state_within_int64() -> None:
    assert interval_for(MIN_REFILL_RATE) == MAX_SPAN_NS
    assert interval_for(MAX_REFILL_RATE) == 1
    assert round(MAX_TTL * NS_PER_S) == MAX_SPAN_NS
    assert round(MIN_TTL * NS_PER_S) == 1
    assert MAX_CAPACITY < MAX_SPAN_NS < INT64_MAX
    # "now" plus the longest span stays far below what msgpack's int64 carries
    assert 2 * 10**18 + MAX_SPAN_NS < INT64_MAX


def test_the_extreme_accepted_config_travels_in_msgpack() -> None:
    extreme = BucketConfig(
        MAX_CAPACITY, interval_for(MIN_REFILL_RATE), round(MAX_TTL * NS_PER_S), "shared", (1, "r")
    )
    wire = msgspec.msgpack.encode(extreme)
    assert msgspec.msgpack.decode(wire, type=BucketConfig) == extreme


def test_the_ranges_patch_accepted_before_are_still_accepted() -> None:
    # api/routes.py's bucket_patch allowed capacity 1..1e15, refillRate 1e-9..1e9, ttl 0.001..1e8
    for capacity in (1, 10**15):
        check_limits(capacity=capacity)
    for rate in (1e-9, 1e9):
        check_limits(refill_rate=rate)
    for ttl in (0.001, 1e8):
        check_limits(ttl=ttl)


@pytest.mark.parametrize(
    ("limits", "field", "message"),
    [
        ({"capacity": MIN_CAPACITY - 1}, "capacity", "capacity must be >= 1, got 0"),
        (
            {"capacity": MAX_CAPACITY + 1},
            "capacity",
            f"capacity must be <= {MAX_CAPACITY}, got {MAX_CAPACITY + 1}",
        ),
        ({"capacity": 2.0}, "capacity", "capacity must be an integer, got 2.0"),
        ({"capacity": True}, "capacity", "capacity must be an integer, got True"),
        ({"refill_rate": 0}, "refillRate", "refillRate must be > 0, got 0"),
        ({"refill_rate": -1.0}, "refillRate", "refillRate must be > 0, got -1.0"),
        ({"refill_rate": math.nan}, "refillRate", "refillRate must be > 0, got nan"),
        ({"refill_rate": math.inf}, "refillRate", "refillRate must be finite, got inf"),
        ({"refill_rate": 9.99e-10}, "refillRate", "refillRate must be >= 1e-9, got 9.99e-10"),
        (
            {"refill_rate": 1.000001e9},
            "refillRate",
            "refillRate must be <= 1e9, got 1000001000.0",
        ),
        ({"refill_rate": "5"}, "refillRate", "refillRate must be a number, got '5'"),
        ({"refill_rate": False}, "refillRate", "refillRate must be a number, got False"),
        ({"ttl": 0.0}, "ttl", "ttl must be > 0, got 0.0"),
        ({"ttl": 1e-10}, "ttl", "ttl must be >= 1e-9, got 1e-10"),
        ({"ttl": 1.0000001e9}, "ttl", "ttl must be <= 1e9, got 1000000100.0"),
        ({"ttl": -math.inf}, "ttl", "ttl must be > 0, got -inf"),
        ({"mode": "fast"}, "mode", "mode must be shared, strict or local, got 'fast'"),
        ({"mode": "Shared"}, "mode", "mode must be shared, strict or local, got 'Shared'"),
    ],
)
def test_check_limits_names_the_field_as_data(
    limits: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(LimitError) as raised:
        check_limits(**limits)
    error = raised.value
    assert error.field == field
    assert str(error) == message
    assert error.problem == message.removeprefix(f"{field} ")
    assert error.problem == f"{error.requirement}, got {error.value!r}"
    assert isinstance(error, ValueError)


def test_check_limits_accepts_the_bounds_themselves_and_ignores_what_is_not_given() -> None:
    check_limits()
    check_limits(
        capacity=MIN_CAPACITY, refill_rate=MIN_REFILL_RATE, ttl=MAX_TTL, mode=bucket.STRICT
    )
    check_limits(capacity=MAX_CAPACITY, refill_rate=MAX_REFILL_RATE, ttl=MIN_TTL)
    check_limits(refill_rate=1, ttl=3600)  # integers are numbers


def test_the_first_bad_limit_is_reported() -> None:
    with pytest.raises(LimitError) as raised:
        check_limits(capacity=0, refill_rate=0, ttl=0, mode="x")
    assert raised.value.field == "capacity"
    with pytest.raises(LimitError) as raised:
        check_limits(capacity=1, refill_rate=0, ttl=0, mode="x")
    assert raised.value.field == "refillRate"


def test_modes_have_one_definition() -> None:
    assert MODES is bucket.MODES
    assert rules.MODES is bucket.MODES
    assert MODES == (bucket.SHARED, bucket.STRICT, bucket.LOCAL)
    for mode in MODES:
        check_limits(mode=mode)
        assert Rule.create("k", 1, 1, mode=mode).mode == mode


# -- tokens ----------------------------------------------------------------------


def test_check_tokens_accepts_zero_to_the_capacity() -> None:
    for tokens in (0, 1, 5):
        check_tokens(tokens, 5)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (-1, "tokens must be between 0 and the capacity 5, got -1"),
        (6, "tokens must be between 0 and the capacity 5, got 6"),
        (1.5, "tokens must be an integer, got 1.5"),
        (True, "tokens must be an integer, got True"),
    ],
)
def test_check_tokens_refuses_with_field_tokens(tokens: Any, message: str) -> None:
    with pytest.raises(LimitError) as raised:
        check_tokens(tokens, 5)
    assert (raised.value.field, str(raised.value)) == ("tokens", message)


# -- Rule and config agree with the validator ---------------------------------------

# (check_limits keyword, value, Rule's field, the config file's field)
REFUSED = [
    ("capacity", 0, "capacity", "capacity"),
    ("capacity", MAX_CAPACITY + 1, "capacity", "capacity"),
    ("refill_rate", 0.0, "refill_rate", "refillRate"),
    ("refill_rate", 5e-10, "refill_rate", "refillRate"),
    ("refill_rate", 2e9, "refill_rate", "refillRate"),
    ("refill_rate", math.inf, "refill_rate", "refillRate"),
    ("ttl", 0.0, "ttl", "ttl"),
    ("ttl", 5e-10, "ttl", "ttl"),
    ("ttl", 2e9, "ttl", "ttl"),
    ("mode", "fast", "mode", "mode"),
]
ACCEPTED = [
    ("capacity", MIN_CAPACITY),
    ("capacity", MAX_CAPACITY),
    ("refill_rate", MIN_REFILL_RATE),
    ("refill_rate", MAX_REFILL_RATE),
    ("ttl", MIN_TTL),
    ("ttl", MAX_TTL),
    ("ttl", 0.001),
    ("mode", "local"),
]
BASE: dict[str, Any] = {"capacity": 10, "refill_rate": 1.0, "ttl": 60.0, "mode": "shared"}
FILE_NAMES = {"capacity": "capacity", "refill_rate": "refillRate", "ttl": "ttl", "mode": "mode"}


def _yaml_value(value: object) -> str:
    """As YAML: ``1e-09`` (no dot) is a string to YAML 1.1, which lax conversion reads
    as the number, as it does ``${VAR}`` values."""
    if isinstance(value, str):
        return value
    return ".inf" if value == math.inf else repr(value)


def _config_with(name: str, value: object) -> str:
    limits = {**BASE, name: value}
    fields = ", ".join(f"{FILE_NAMES[k]}: {_yaml_value(v)}" for k, v in limits.items())
    return f"buckets:\n  - {{key: 'k-{{{{ .Request.ClientIP }}}}', {fields}}}\n"


@pytest.mark.parametrize(("name", "value", "rule_field", "file_field"), REFUSED)
def test_a_value_the_validator_refuses_is_refused_everywhere_naming_the_same_field(
    name: str, value: object, rule_field: str, file_field: str
) -> None:
    with pytest.raises(LimitError) as limit:
        check_limits(**{name: value})
    with pytest.raises(RuleError) as rule:
        Rule.create("k", **{**BASE, name: value})
    with pytest.raises(ConfigError) as config:
        parse_config(_config_with(name, value), file="bucketmesh.yaml", environ={})
    assert limit.value.field == file_field
    assert rule.value.field == rule_field
    assert (config.value.field, config.value.rule) == (file_field, 1)
    assert rule.value.problem == limit.value.problem
    assert config.value.message.startswith(limit.value.requirement + ", got ")


def _partners(name: str, value: object) -> dict[str, Any]:
    """The other limits beside an extreme one: capacity × (1/refillRate) stays ≤ 1e18 ns."""
    if name == "capacity" and value == MAX_CAPACITY:
        return {"refill_rate": MAX_REFILL_RATE}
    if name == "refill_rate" and value == MIN_REFILL_RATE:
        return {"capacity": 1}
    return {}


@pytest.mark.parametrize(("name", "value"), ACCEPTED)
def test_a_value_the_validator_accepts_loads_everywhere(name: str, value: object) -> None:
    check_limits(**{name: value})
    partners = _partners(name, value)
    built = Rule.create("k", **{**BASE, **partners, name: value})
    limits = {**BASE, **partners, name: value}
    fields = ", ".join(f"{FILE_NAMES[k]}: {_yaml_value(v)}" for k, v in limits.items())
    text = f"buckets:\n  - {{key: 'k-{{{{ .Request.ClientIP }}}}', {fields}}}\n"
    loaded = parse_config(text, environ={}).buckets[0]
    assert getattr(loaded, name) == getattr(built, name) == value


def test_a_rate_shorthand_out_of_range_names_the_rate_field() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config("buckets:\n  - {key: k, rate: 1/100000000 days}\n", file="b.yaml", environ={})
    assert raised.value.field == "rate"
    assert "gives refillRate" in raised.value.message
    assert raised.value.message.endswith("which must be >= 1e-9")


def test_template_and_rate_errors_carry_their_field() -> None:
    with pytest.raises(RuleError) as template:
        Rule.create("x-{{ .Request.Nope }}", 1, 1)
    assert template.value.field == "key"
    assert str(template.value) == template.value.problem
    assert str(template.value).startswith("unknown placeholder {{ .Request.Nope }}")
    with pytest.raises(RuleError) as rate:
        rules.parse_rate("5 per fortnight")
    assert rate.value.field == "rate"
    assert str(rate.value) == rate.value.problem
    assert "unknown unit 'fortnight'" in str(rate.value)


# -- where msgspec errors point ---------------------------------------------------


class _Inner(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    count: Annotated[int, msgspec.Meta(ge=1)] = 1
    urls: dict[str, str] = {}
    items: tuple[int, ...] = ()


class _Outer(msgspec.Struct, forbid_unknown_fields=True):
    required: int
    inner: _Inner = _Inner()
    rows: tuple[_Inner, ...] = ()


def _location(raw: object) -> Any:
    with pytest.raises(msgspec.ValidationError) as raised:
        msgspec.convert(raw, _Outer, strict=False)
    return error_location(raised.value)


@pytest.mark.parametrize(
    ("raw", "path", "name", "in_key", "field"),
    [
        ({"required": 1, "inner": {"count": 0}}, ("inner", "count"), None, False, "inner.count"),
        ({"required": "x"}, ("required",), None, False, "required"),
        ({}, (), "required", False, "required"),
        ({"required": 1, "zz": 1}, (), "zz", False, "zz"),
        ({"required": 1, "rows": [{}, {"zz": 1}]}, ("rows", 1), "zz", False, "rows[1].zz"),
        (
            {"required": 1, "inner": {"items": [1, "x"]}},
            ("inner", "items", 1),
            None,
            False,
            "inner.items[1]",
        ),
        (
            {"required": 1, "inner": {"urls": {"a": 1}}},
            ("inner", "urls", ...),
            None,
            False,
            "inner.urls[...]",
        ),
        ({"required": 1, "inner": {"urls": {1: "a"}}}, ("inner", "urls"), None, True, "inner.urls"),
    ],
)
def test_error_location_reads_the_path_once_into_data(
    raw: object, path: tuple[object, ...], name: str | None, in_key: bool, field: str
) -> None:
    location = _location(raw)
    assert (location.path, location.name, location.in_key, location.field) == (
        path,
        name,
        in_key,
        field,
    )
    assert " - at `" not in location.detail


def test_error_location_keeps_the_sentence_as_detail() -> None:
    location = _location({"required": 1, "inner": {"count": 0}})
    assert location.detail == "Expected `int` >= 1"


# -- issue 12 case 1(a): the state never leaves int64 ------------------------------------


def test_a_burst_longer_than_the_state_can_carry_is_refused_naming_the_field() -> None:
    """capacity × (1/refillRate) is a span of the state: at most 1e18 ns. A file names
    the field, and so does a PATCH of one field (the one it changed)."""
    with pytest.raises(ConfigError) as raised:
        parse_config(
            "buckets:\n  - {key: k, capacity: 20, refillRate: 1e-9}\n", file="b.yaml", environ={}
        )
    assert raised.value.field == "refillRate"
    assert "must be >= 2e-8 for capacity 20" in raised.value.message
    limiter = Limiter(
        [Rule.create("k-{{ .Request.ClientIP }}", 5000, 50.0, name="k")], replica_id="a"
    )
    now = 1_800_000_000 * NS_PER_S
    for _ in range(20):
        assert limiter.acquire("k-1", now=now).allowed
    with pytest.raises(LimitError) as refused:
        limiter.configure("k-1", refill_rate=1e-9, now=now)
    assert refused.value.field == "refillRate"
    slow = Limiter([Rule.create("s-{{ .Request.ClientIP }}", 10, 0.05, name="s")], replica_id="a")
    with pytest.raises(LimitError) as refused:
        slow.configure("s", capacity=10**9, now=now)
    assert refused.value.field == "capacity"
    assert refused.value.requirement.startswith("must be <= 50000000 at refillRate 0.05")
    # the largest burst the state carries is accepted
    slow.configure("s", capacity=50_000_000, now=now)


_extreme_capacity = st.sampled_from([1, 2, 10, 1_000, 10**6, 2**40, MAX_CAPACITY])
_extreme_rate = st.sampled_from([MIN_REFILL_RATE, 1e-6, 0.05, 1.0, 333.0, 1e6, MAX_REFILL_RATE])
_extreme_ttl = st.sampled_from([MIN_TTL, 0.5, 3600.0, 1e6, MAX_TTL])
_history = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 1), st.integers(0, 10**6), st.integers(0, 4)),
        st.tuples(
            st.just("configure"),
            st.integers(0, 1),
            st.one_of(st.none(), _extreme_capacity),
            st.one_of(st.none(), _extreme_rate),
            st.one_of(st.none(), _extreme_ttl),
        ),
        st.tuples(st.just("merge"), st.integers(0, 1), st.booleans()),
        st.tuples(st.just("expire"), st.integers(0, 1)),
    ),
    max_size=60,
)
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(DeltaBatch).decode


@settings(max_examples=300, deadline=None)
@given(
    capacity=_extreme_capacity,
    rate=_extreme_rate,
    ttl=_extreme_ttl,
    history=_history,
    steps=st.lists(st.sampled_from([0, 1, 10**3, 10**9, 10**12, 10**15, 10**17]), min_size=1),
)
def test_no_sequence_of_acquires_patches_and_merges_leaves_the_wire_format(
    capacity: int,
    rate: float,
    ttl: float,
    history: list[tuple[Any, ...]],
    steps: list[int],
) -> None:
    """Extreme limits the validator accepts, long histories (time steps up to ~3 years,
    grants of whole buckets, PATCHes of any field, merges both ways, expiry): every delta,
    full state and snapshot is encoded with the real msgpack encoder, which refuses any
    integer outside int64 (OverflowError), and decodes back to the same state."""
    try:
        rule = Rule.create("k-{{ .Request.ClientIP }}", capacity, rate, name="k", ttl=ttl)
    except RuleError:
        return  # refused at the door: nothing to carry
    limiters = [Limiter([rule], replica_id=f"r{i}/n/1") for i in range(2)]
    now = 1_800_000_000 * NS_PER_S
    for step, op in enumerate(history):
        now += steps[step % len(steps)]
        limiter = limiters[op[1]]
        if op[0] == "acquire":
            size = limiter.inspect("k-1", now=now).config.capacity
            tokens = min(size, op[3] if op[2] % 2 else size)
            limiter.acquire("k-1", tokens, now=now)
        elif op[0] == "configure":
            target = "k" if op[1] else "k-1"
            with contextlib.suppress(LimitError):  # refused, naming a field: no change
                limiter.configure(target, capacity=op[2], refill_rate=op[3], ttl=op[4], now=now)
        elif op[0] == "merge":
            source = limiters[1 - op[1]]
            batch = source.full_state() if op[2] else source.collect_deltas()
            limiter.merge(_decode(_encode(batch)), now=now)
        else:
            limiter.expire(now)
        for each in limiters:
            for batch in (each.full_state(), each.collect_journal() or DeltaBatch("x", [])):
                data = _encode(batch)  # OverflowError here is the defect
                assert _decode(data) == batch
            Limiter.restore(each.snapshot(), [rule], replica_id=each.replica_id)
            for held in each.buckets.values():
                for value in (held.base_time, held.base_used, held.total):
                    assert -INT64_MAX <= value <= INT64_MAX

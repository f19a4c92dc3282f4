"""The simulator generates the schedules of issue 12's cases 1, 5 and 11 (``bucketmesh
sim --kind extreme|files|strict-idle``; case 10's straddling partition is part of the
random schedule), every generated schedule holds every invariant, and each generator
finds the old defect when a mutant puts it back into the core:

* case 10 (``random``): a later generation that does not carry the earlier one's
  debt (no ``Bucket.carry``) converges below the GCRA of every grant;

* case 1 (``extreme``): a config change that carries an unclamped backlog and no
  capacity × interval check (the core before the fix) ships a delta outside int64;
  a PATCH applied before it is refused leaves state behind;
* case 5 (``files``): file versions ordered by their digest (no load stamp), or a
  restart that does not move restored rules and buckets to the file's limits, leave
  replicas on the old file after rolling restarts;
* case 11 (``strict-idle``): a strict key's per-key config dropped with its expired
  bucket makes that region fall back to the rule's share.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest

from bucketmesh import _native
from bucketmesh.core import limiter as limiter_module
from bucketmesh.core.bucket import MAX_BACKLOG_NS, Bucket, BucketConfig, Version
from bucketmesh.core.limiter import Limiter, rule_digest
from bucketmesh.core.rules import Rule
from bucketmesh.tooling.sim import (
    CASE_KINDS,
    MS,
    WALL_START_NS,
    InvariantViolation,
    Network,
    Simulation,
    main,
    run,
)

SEEDS = 1000
MUTANT_SEEDS = 200


@pytest.mark.parametrize("kind", CASE_KINDS)
def test_generated_schedules_hold_every_invariant(kind: str) -> None:
    failures = []
    results = []
    for seed in range(SEEDS):
        try:
            results.append(run(seed, kind=kind))
        except InvariantViolation as violation:
            failures.append(str(violation))
    assert not failures, f"{len(failures)} of {SEEDS} failed:\n" + "\n".join(failures[:10])
    # not vacuous: what each generator is for happened
    assert sum(result.granted for result in results) > 1000
    assert sum(result.partitions for result in results) > 100
    if kind == "extreme":
        assert sum(result.refused for result in results) > 100
        assert sum(result.configures for result in results) > 1000
    if kind == "files":
        assert sum(result.restarts for result in results) > 2 * SEEDS
        # restarts from the write-ahead log alone (kill -9 before the first snapshot)
        assert sum(result.log_restarts for result in results) > SEEDS // 2
    if kind == "strict-idle":
        assert sum(result.configures for result in results) > SEEDS


def test_the_command_line_runs_the_case_generators(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("18 schedules (9 random, 3 extreme, 3 files, 3 strict-idle) in ")
    assert "0 violations" in out
    assert main(["--seeds", "4", "--kind", "files", "--replicas", "3"]) == 0
    assert capsys.readouterr().out.startswith("4 schedules (4 files) in ")


# -- mutants: the old defects, put back ---------------------------------------------


def reconfigure_unclamped(self: Bucket, config: BucketConfig, now_ns: int) -> None:
    """``Bucket.reconfigure`` before issue 12 case 1: the backlog carried in full."""
    old = self.config
    backlog_old = max(0, self.tat() - now_ns)
    backlog = -(-backlog_old * config.interval_ns // old.interval_ns)
    backlog = max(0, backlog + (config.capacity - old.capacity) * config.interval_ns)
    self.config = config
    self.base_version = config.version
    self.base_time = now_ns + backlog
    self.base_used = self.total
    self._derive_edge()
    self._recompute()


original_configure = Limiter.configure
original_drop = Limiter._drop


def configure_half_applied(self: Limiter, target: str, **limits: object) -> BucketConfig:
    """A PATCH applied first and refused after (the state is left changed)."""
    check = limiter_module.check_burst
    limiter_module.check_burst = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        new = original_configure(self, target, **limits)  # type: ignore[arg-type]
    finally:
        limiter_module.check_burst = check
    check(new.capacity, new.interval_ns)
    return new


def file_version_unstamped(rule: Rule, stamp: int = 0) -> Version:
    """File versions before the fix: equal clocks, ordered by the digest's string."""
    return (0, f"rule:{rule.name}:{rule_digest(rule)}")


def stamp_nothing(self: Limiter, now: int | None = None) -> list[str]:
    """Before the fix a restart loaded the file beside the restored rules and buckets."""
    return []


def drop_with_key_config(self: Limiter, key: str, now: int) -> None:
    """Before the fix an expired strict bucket took its per-key config with it."""
    original_drop(self, key, now)
    self.key_configs.pop(key, None)


# A mutant patched into the core is bypassed by the compiled build's native calls:
# these run on the pure core (make test's BUCKETMESH_PURE=1 pass).
pure_core_only = pytest.mark.skipif(
    _native.compiled(), reason="patches the core: runs on the pure core (BUCKETMESH_PURE=1)"
)


def violations(kind: str) -> Iterator[InvariantViolation]:
    for seed in range(MUTANT_SEEDS):
        try:
            run(seed, kind=kind)
        except InvariantViolation as violation:
            yield violation


@pure_core_only
def test_case_1_generator_finds_an_unclamped_config_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limiter_module, "check_burst", lambda *args, **kwargs: None)
    monkeypatch.setattr(Bucket, "reconfigure", reconfigure_unclamped)
    found = list(violations("extreme"))
    assert found, "the extreme-limits schedules did not notice"
    assert {violation.invariant for violation in found} == {"every delta encodes"}
    assert "outside int64" in str(found[0]) or "cannot be encoded" in str(found[0])
    assert "--kind extreme" in str(found[0])


def test_case_1_generator_finds_a_refused_patch_that_changed_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Limiter, "configure", configure_half_applied)
    found = {violation.invariant for violation in violations("extreme")}
    assert "a refused PATCH leaves the state untouched" in found


@pytest.mark.parametrize(
    ("target", "name", "broken"),
    [
        pytest.param(limiter_module, "file_version", file_version_unstamped, marks=pure_core_only),
        (Limiter, "stamp_file_rules", stamp_nothing),
    ],
    ids=["digest-ordered-file-versions", "restart-keeps-restored-rules"],
)
def test_case_5_generator_finds_a_file_change_that_does_not_win(
    monkeypatch: pytest.MonkeyPatch, target: object, name: str, broken: object
) -> None:
    monkeypatch.setattr(target, name, broken)
    found = {violation.invariant for violation in violations("files")}
    assert "the newest rules file wins" in found, found


@pure_core_only
def test_case_11_generator_finds_a_strict_key_config_lost_on_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Limiter, "_drop", drop_with_key_config)
    found = {violation.invariant for violation in violations("strict-idle")}
    assert "a strict key's per-key config outlives its bucket" in found, found


@pure_core_only
def test_case_10_random_schedules_find_a_generation_that_drops_its_debt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Case 10's straddling partitions are part of the random schedule: without the
    carry (the core before the fix), the later generation forgets the earlier one's
    debt, and the converged TAT falls below the GCRA of every grant."""
    monkeypatch.setattr(Bucket, "carry", lambda self, since_ns: 0)
    found = set()
    for seed in range(400):
        try:
            run(seed)
        except InvariantViolation as violation:
            found.add(violation.invariant)
    assert found == {"a generation's debt survives the epoch boundary"}


# -- the issue's own schedules, written out ------------------------------------------


def test_case_1_the_seed_rule_throttled_to_one_token_a_day_keeps_replicating() -> None:
    """The seed rule (5000, 50/s) used at its limit, then throttled to one token a day;
    a 0.05/s key raised to a capacity of 1e9 (refused: it would take 634 years to
    refill); the regions keep replicating and converge."""
    rules = [
        Rule.create("api-{{ .Request.Header.X-Key }}", 5000, 50.0, name="api"),
        Rule.create("slow-{{ .Request.Header.X-Key }}", 10, 0.05, name="slow"),
    ]
    sim = Simulation(
        1,
        2,
        rules,
        {"api-1": "api", "slow-1": "slow"},
        network=Network(1 * MS, 5 * MS),
        start_ns=WALL_START_NS,
    )
    sim.check_int64 = True
    t0 = sim.start_ns
    for i in range(40):  # region 0 spends the bucket (an hour at its limit, in short)
        sim.acquire(t0 + i * MS, 0, "api-1", 500)
        sim.acquire(t0 + i * MS, 0, "slow-1")
    sim.configure(t0 + 50 * MS, 0, "api", refill_rate=1 / 86_400)
    sim.configure(t0 + 60 * MS, 1, "slow-1", capacity=10**9)
    for i in range(20):  # both regions, once each has heard of the spending and the PATCH
        sim.acquire(t0 + 100 * MS + i * MS, i % 2, "api-1")
    sim.run(t0 + 300 * MS)
    sim.quiesce()
    result = sim.check()
    assert result.refused == 1 and result.configures == 2
    # the throttled bucket grants only what refilled before the PATCH (50/s for 50 ms
    # after the first grant, and slices of it, at most 4), nothing at one token a day
    assert 5000 + 10 <= result.granted <= 5000 + 10 + 4
    for limiter in sim.limiters:
        bucket = limiter.bucket("api-1")
        assert bucket is not None and bucket.base_time < 2**63
        assert bucket.config.interval_ns == 86_400 * 10**9
        msgspec.msgpack.decode(limiter.snapshot())


def test_case_1_bounds_are_what_the_generator_relies_on() -> None:
    # the clamp every config change applies keeps "now + backlog" inside int64
    assert WALL_START_NS + MAX_BACKLOG_NS < 2**63 - 1

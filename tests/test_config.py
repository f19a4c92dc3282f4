"""The config file: the seed formats, every error's wording, ${VAR} and overrides."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bucketmesh.core.rules import KeyTemplate
from bucketmesh.node.config import (
    DEFAULT_PEER_URL_TEMPLATE,
    ENV_OVERRIDES,
    Config,
    ConfigError,
    apply_overrides,
    env_overrides,
    load_buckets,
    load_config,
    parse_config,
    parse_listen,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "src" / "bucketmesh" / "examples"

SEED_CONFIG = """\
region: us-east-1
listen: 0.0.0.0:8080
sync:
  enabled: true
  syncClusterId: "global-rate-limit-cluster"
  peers:                      # region names; this node's own region may be listed and is skipped
    - "us-east-1"
    - "us-west-2"
    - "eu-central-1"
  peerUrls:                   # how to reach each region (or one template: "http://bucketmesh-{region}:8080")
    us-west-2: http://10.1.0.5:8080
    eu-central-1: http://10.2.0.5:8080
  secret: ${BUCKETMESH_SYNC_SECRET}
storage:
  backend: memory             # memory (default, snapshot file) | redis
  snapshot: ./data/state.snap
  redisUrl: redis://localhost:6379/0
admin:
  token: ${BUCKETMESH_ADMIN_TOKEN}
buckets:                      # may also be a separate buckets.yaml holding just this list
  - key: "agent-api-key-{{ .Request.Header.X-API-Key }}"
    capacity: 5000
    refillRate: 50            # tokens per second
    ttl: 3600                 # seconds a full, idle bucket is kept
  - name: per-ip
    key: "ip-{{ .Request.ClientIP }}"
    rate: "100/minute"        # shorthand: capacity 100, refill 100 per 60 s
    mode: strict              # shared (default) | strict | local
"""  # copied verbatim from docs/api.md


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def config_error(text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        parse_config(textwrap.dedent(text), file="bucketmesh.yaml", environ=environ or {})
    return raised.value


def rule_error(rules: str, environ: dict[str, str] | None = None) -> str:
    """The error a buckets.yaml holding ``rules`` gives, as printed."""
    return str(config_error("buckets:\n" + textwrap.indent(textwrap.dedent(rules), "  "), environ))


BASE_RULE = 'key: "k-{{ .Request.ClientIP }}"'


# -- the seed formats --------------------------------------------------------------


def test_seed_config_loads_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETMESH_SYNC_SECRET", "s3cret")
    monkeypatch.setenv("BUCKETMESH_ADMIN_TOKEN", "adm1n")
    path = write(tmp_path, "bucketmesh.yaml", SEED_CONFIG)

    config = load_config(path)

    assert config.path == path
    assert config.region == "us-east-1"
    assert config.node == "node-a"
    assert config.listen == "0.0.0.0:8080"
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8080)
    assert config.sync.enabled is True
    assert config.sync.sync_cluster_id == "global-rate-limit-cluster"
    assert config.sync.peers == ("us-east-1", "us-west-2", "eu-central-1")
    assert config.sync.peer_urls == {
        "us-west-2": "http://10.1.0.5:8080",
        "eu-central-1": "http://10.2.0.5:8080",
    }
    assert config.sync.secret == "s3cret"
    assert (config.sync.interval_ms, config.sync.peer_timeout_ms) == (20, 1000)
    assert config.regions == ("us-east-1", "us-west-2", "eu-central-1")
    assert config.remote_peers == {
        "us-west-2": "http://10.1.0.5:8080",
        "eu-central-1": "http://10.2.0.5:8080",
    }
    assert config.storage.backend == "memory"
    assert config.storage.snapshot == "./data/state.snap"
    assert config.storage.redis_url == "redis://localhost:6379/0"
    assert config.storage.durability == "relaxed"
    assert config.admin.token == "adm1n"
    assert config.limits.max_buckets == 1_000_000
    assert config.limits.max_body_bytes == 65536
    assert config.limits.max_header_bytes == 16384

    agent, per_ip = config.buckets
    assert agent.name == "agent-api-key"
    assert agent.template == KeyTemplate("agent-api-key-{{ .Request.Header.X-API-Key }}")
    assert (agent.capacity, agent.refill_rate, agent.ttl, agent.mode) == (
        5000,
        50.0,
        3600.0,
        "shared",
    )
    assert per_ip.name == "per-ip"
    assert per_ip.capacity == 100
    assert per_ip.refill_rate == pytest.approx(100 / 60)
    assert per_ip.mode == "strict"
    assert per_ip.on_store_failure == "local"


def test_seed_buckets_example_loads() -> None:
    agent, per_ip = load_buckets(EXAMPLES / "buckets.yaml")
    assert (agent.name, agent.key, agent.capacity, agent.refill_rate, agent.ttl) == (
        "agent-api-key",
        "agent-api-key-{{ .Request.Header.X-API-Key | sha256 }}",  # no API key in a key
        5000,
        50.0,
        3600.0,
    )
    assert (per_ip.name, per_ip.key, per_ip.capacity, per_ip.mode) == (
        "per-ip",
        "ip-{{ .Request.ClientIP }}",
        100,
        "shared",
    )
    assert per_ip.refill_rate == pytest.approx(100 / 60)


def test_single_node_example_loads() -> None:
    config = load_config(EXAMPLES / "bucketmesh.yaml", environ={})
    assert (config.region, config.listen_host, config.listen_port) == (
        "us-east-1",
        "127.0.0.1",
        8080,
    )
    assert config.sync.enabled is False
    assert config.storage.snapshot == "./data/state.snap"
    assert config.admin.token is None
    assert [rule.name for rule in config.buckets] == ["agent-api-key", "small", "per-ip"]
    small = config.buckets[1]
    assert (small.capacity, small.refill_rate) == (5, 1.0)
    assert small.template.render({}, {"user": "alice"}, "") == "small-alice"
    assert config.regions == ("us-east-1",)
    assert config.remote_peers == {}


def test_empty_file_gives_the_defaults() -> None:
    config = parse_config("", environ={})
    assert config == Config()
    assert (config.region, config.node, config.listen) == ("local", "node-a", "127.0.0.1:8080")
    assert config.buckets == ()
    assert config.storage.snapshot is None
    assert config.sync.enabled is False


def test_empty_sections_mean_defaults() -> None:
    config = parse_config("admin:\nsync:\nbuckets:\nstorage:\n  snapshot:\n", environ={})
    assert config.admin.token is None
    assert config.buckets == ()
    assert config.storage.snapshot is None


# -- syntax and shape -------------------------------------------------------------


def test_yaml_syntax_error_names_the_line() -> None:
    error = config_error(
        """\
        region: us-east-1
        sync:
          enabled: true
          peers: [a, b
        """
    )
    assert error.file == "bucketmesh.yaml"
    assert error.line == 5
    assert str(error).startswith("bucketmesh.yaml: line 5: YAML syntax error: ")


def test_duplicate_key_is_an_error_not_a_silent_override() -> None:
    error = config_error(
        """\
        buckets:
          - key: "k-{{ .Request.ClientIP }}"
            capacity: 5
            capacity: 50
            refillRate: 1
        """
    )
    assert str(error) == "bucketmesh.yaml: line 4: duplicate key 'capacity' (first given on line 3)"


def test_yaml_merge_keys_may_override() -> None:
    config = parse_config(
        textwrap.dedent(
            """\
            buckets:
              - &base {key: "a-{{ .Request.ClientIP }}", capacity: 5, refillRate: 1}
              - <<: *base
                key: "b-{{ .Request.ClientIP }}"
                capacity: 50
            """
        ),
        environ={},
    )
    assert [(rule.name, rule.capacity) for rule in config.buckets] == [("a", 5), ("b", 50)]


def test_top_level_must_be_a_mapping() -> None:
    assert str(config_error("- a\n- b\n")) == (
        "bucketmesh.yaml: expected a mapping of settings, got a list"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as raised:
        load_config(missing)
    assert str(raised.value) == f"{missing}: cannot read the file: No such file or directory"
    assert raised.value.file == missing


# -- settings errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        (
            "sync:\n  syncClusterId: 5\n",
            "sync.syncClusterId",
            "bucketmesh.yaml: sync.syncClusterId: expected a string, got 5",
        ),
        (
            "regoin: x\n",
            "regoin",
            "bucketmesh.yaml: regoin is not a known field (did you mean region?)",
        ),
        (
            "bucket: []\n",
            "bucket",
            "bucketmesh.yaml: bucket is not a known field (did you mean buckets?)",
        ),
        (
            "sync:\n  peerUrl: {}\n",
            "sync.peerUrl",
            "bucketmesh.yaml: sync.peerUrl is not a known field (did you mean peerUrls?)",
        ),
        (
            "sync:\n  zzz: 1\n",
            "sync.zzz",
            "bucketmesh.yaml: sync.zzz is not a known field; known: enabled, syncClusterId, "
            "peers, peerUrls, peerUrlTemplate, secret, secretFile, interval, peerTimeout",
        ),
        ("sync: 5\n", "sync", "bucketmesh.yaml: sync: expected a mapping, got 5"),
        (
            "sync:\n  enabled: maybe\n",
            "sync.enabled",
            "bucketmesh.yaml: sync.enabled: expected true or false, got 'maybe'",
        ),
        (
            "sync:\n  interval: 0\n",
            "sync.interval",
            "bucketmesh.yaml: sync.interval must be >= 1, got 0",
        ),
        (
            "sync:\n  peers: [a, 5]\n",
            "sync.peers[1]",
            "bucketmesh.yaml: sync.peers[1]: expected a string, got 5",
        ),
        (
            "sync:\n  peers: [a, b, a]\n",
            "sync.peers",
            "bucketmesh.yaml: sync.peers lists 'a' twice",
        ),
        (
            "sync:\n  peers: [us east]\n",
            "sync.peers[0]",
            "bucketmesh.yaml: sync.peers[0] must be 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, got 'us east'",
        ),
        (
            "sync:\n  peers: [a]\n  peerUrls: {a: 5}\n",
            "sync.peerUrls.a",
            "bucketmesh.yaml: sync.peerUrls.a: expected a string, got 5",
        ),
        (
            "sync:\n  peers: [a]\n  peerUrls: {a: 'ftp://x'}\n",
            "sync.peerUrls.a",
            "bucketmesh.yaml: sync.peerUrls.a must be an http:// or https:// URL, got 'ftp://x'",
        ),
        (
            "sync:\n  peers: [a]\n  peerUrls: {a: 'http://x:99999'}\n",
            "sync.peerUrls.a",
            "bucketmesh.yaml: sync.peerUrls.a must be an http:// or https:// URL, "
            "got 'http://x:99999'",
        ),
        (
            "sync:\n  peers: [eu-central-1]\n  peerUrls: {eu-centrall-1: 'http://x'}\n",
            "sync.peerUrls.eu-centrall-1",
            "bucketmesh.yaml: sync.peerUrls.eu-centrall-1 is not a region listed in sync.peers "
            "(did you mean eu-central-1?)",
        ),
        (
            "sync:\n  peerUrls: 'http://bucketmesh:8080'\n",
            "sync.peerUrls",
            "bucketmesh.yaml: sync.peerUrls must contain {region}, got 'http://bucketmesh:8080'",
        ),
        (
            "sync:\n  peerUrls: 5\n",
            "sync.peerUrls",
            "bucketmesh.yaml: sync.peerUrls: expected a mapping of region to URL or a {region} "
            "template string, got 5",
        ),
        (
            "sync:\n  enabled: true\n  peers: [a]\n  peerUrls: {a: 'http://a'}\n",
            "sync.secret",
            "bucketmesh.yaml: sync.secret is required when sync.enabled is true: set "
            "sync.secret (e.g. secret: ${BUCKETMESH_SYNC_SECRET}) or the environment variable "
            "BUCKETMESH_SYNC_SECRET, or point sync.secretFile or BUCKETMESH_SYNC_SECRET_FILE "
            "at a file holding it (a mounted Kubernetes Secret)",
        ),
        (
            "region: a\nsync:\n  enabled: true\n  secret: s\n  peers: [a, b, c]\n"
            "  peerUrls: {c: 'http://c:8080'}\n",
            "sync.peerUrls",
            "bucketmesh.yaml: sync.peerUrls has no URL for region 'b', which sync.peers lists; "
            "add sync.peerUrls.b (or BUCKETMESH_SYNC_PEER_URLS=region=url,...), or give a "
            'template such as "http://bucketmesh-{region}:8080" instead of a map',
        ),
        (
            "sync:\n  secret: s\n  secretFile: /run/secrets/sync\n",
            "sync.secretFile",
            "bucketmesh.yaml: sync.secretFile cannot be given with sync.secret; keep one",
        ),
        (
            "sync:\n  enabled: true\n  secretFile: /nonexistent/secret\n",
            "sync.secretFile",
            "bucketmesh.yaml: sync.secretFile cannot read '/nonexistent/secret': "
            "No such file or directory",
        ),
        (
            'defaultStateKey: "x-{{ .Request.Nope }}"\n',
            "defaultStateKey",
            "bucketmesh.yaml: defaultStateKey: unknown placeholder {{ .Request.Nope }} in key "
            "template 'x-{{ .Request.Nope }}'",
        ),
        (
            "sync:\n  syncClusterId: ''\n",
            "sync.syncClusterId",
            "bucketmesh.yaml: sync.syncClusterId must not be empty",
        ),
        (
            "storage:\n  backend: disk\n",
            "storage.backend",
            "bucketmesh.yaml: storage.backend must be memory or redis, got 'disk'",
        ),
        (
            "storage:\n  durability: eventual\n",
            "storage.durability",
            "bucketmesh.yaml: storage.durability must be relaxed or strict, got 'eventual'",
        ),
        (
            "storage:\n  backend: redis\n  redisUrl: 'http://localhost'\n",
            "storage.redisUrl",
            "bucketmesh.yaml: storage.redisUrl must be a redis://, rediss://, unix://, "
            "redis-cluster:// or rediss-cluster:// URL, got 'http://localhost'",
        ),
        (
            "storage:\n  backend: redis\n  redisUrl: 'redis-cluster://10.0.0.1:7000,10.0.0.2'\n",
            "storage.redisUrl",
            "bucketmesh.yaml: storage.redisUrl must list the cluster's nodes as "
            "host:port[,host:port...], got '10.0.0.2'",
        ),
        (
            "storage:\n  backend: redis\n  redisUrl: 'redis-cluster://10.0.0.1:7000/2'\n",
            "storage.redisUrl",
            "bucketmesh.yaml: storage.redisUrl must name no database (Redis Cluster has "
            "database 0 only), got '/2'",
        ),
        (
            "limits:\n  maxBuckets: 0\n",
            "limits.maxBuckets",
            "bucketmesh.yaml: limits.maxBuckets must be >= 1, got 0",
        ),
        (
            "limits:\n  maxBodyBytes: 1.5\n",
            "limits.maxBodyBytes",
            "bucketmesh.yaml: limits.maxBodyBytes: expected an integer, got 1.5",
        ),
        (
            "region: us/east\n",
            "region",
            "bucketmesh.yaml: region must be 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, got 'us/east'",
        ),
        ("node: ''\n", "node", "bucketmesh.yaml: node must be 1-63 letters"),
        (
            "listen: localhost\n",
            "listen",
            "bucketmesh.yaml: listen: expected host:port such as 0.0.0.0:8080, :8080 or "
            "[::1]:8080, got 'localhost'",
        ),
        (
            "listen: '::1:8080'\n",
            "listen",
            "bucketmesh.yaml: listen: expected host:port such as 0.0.0.0:8080, :8080 or "
            "[::1]:8080, got '::1:8080' (an IPv6 address goes in brackets)",
        ),
        (
            "listen: 'host:70000'\n",
            "listen",
            "bucketmesh.yaml: listen: port must be 0-65535, got 'host:70000'",
        ),
        (
            "buckets: 5\n",
            "buckets",
            "bucketmesh.yaml: buckets: expected a list of rules or the path of a buckets file, "
            "got 5",
        ),
        ("1: x\n", "", "bucketmesh.yaml: has a field name that is not a string"),
    ],
)
def test_invalid_setting_names_file_field_and_value(text: str, field: str, message: str) -> None:
    error = config_error(text)
    assert str(error).startswith(message)
    assert error.field == field
    assert error.file == "bucketmesh.yaml"
    assert error.rule is None


def test_peers_without_urls_are_fine_while_sync_is_off() -> None:
    config = parse_config("region: a\nsync:\n  peers: [a, b, c]\n", environ={})
    assert config.sync.peers == ("a", "b", "c")
    assert config.remote_peers == {}
    assert config.regions == ("a",)


def test_peer_url_template_covers_every_peer() -> None:
    config = parse_config(
        textwrap.dedent(
            """\
            region: us-east-1
            sync:
              enabled: true
              secret: s
              peers: [us-east-1, us-west-2, eu-central-1]
              peerUrls: "http://bucketmesh-{region}:8080"
            """
        ),
        environ={},
    )
    assert config.sync.peer_url_template == "http://bucketmesh-{region}:8080"
    assert config.sync.url_for("us-west-2") == "http://bucketmesh-us-west-2:8080"
    assert config.remote_peers == {
        "us-west-2": "http://bucketmesh-us-west-2:8080",
        "eu-central-1": "http://bucketmesh-eu-central-1:8080",
    }


def test_explicit_urls_win_over_the_template() -> None:
    config = parse_config(
        "region: a\nsync:\n  enabled: true\n  secret: s\n  peers: [a, b, c]\n"
        "  peerUrls: {b: 'https://b.example'}\n  peerUrlTemplate: 'http://{region}:1'\n",
        environ={},
    )
    assert config.remote_peers == {"b": "https://b.example", "c": "http://c:1"}


def test_peers_default_to_the_regions_with_urls() -> None:
    config = parse_config(
        "region: a\nsync:\n  enabled: true\n  secret: s\n  peerUrls: {b: 'http://b:8080'}\n",
        environ={},
    )
    assert config.sync.peers == ("b",)
    assert config.regions == ("a", "b")
    assert config.remote_peers == {"b": "http://b:8080"}


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("0.0.0.0:8080", "0.0.0.0", 8080),
        (":8080", "0.0.0.0", 8080),
        ("[::1]:8080", "::1", 8080),
        ("localhost:9000", "localhost", 9000),
        ("127.0.0.1:0", "127.0.0.1", 0),
    ],
)
def test_listen_is_split_into_host_and_port(listen: str, host: str, port: int) -> None:
    assert parse_listen(listen) == (host, port)
    config = parse_config(f"listen: '{listen}'\n", environ={})
    assert (config.listen_host, config.listen_port) == (host, port)


def test_bare_port_number_listens_everywhere() -> None:
    config = parse_config("listen: 8080\n", environ={})
    assert (config.listen, config.listen_host, config.listen_port) == (":8080", "0.0.0.0", 8080)


@pytest.mark.parametrize("listen", ["", "8080", "host:", "[::1]8080", "[nope]:80", "a b:80", ":-1"])
def test_malformed_listen_is_rejected(listen: str) -> None:
    with pytest.raises(ValueError, match="expected host:port"):
        parse_listen(listen)


def test_empty_secret_and_token_mean_none() -> None:
    config = parse_config("admin:\n  token: ''\nsync:\n  secret: ''\n", environ={})
    assert config.admin.token is None
    assert config.sync.secret is None


def test_repr_hides_secret_and_token() -> None:
    config = parse_config("admin:\n  token: t0p\nsync:\n  secret: s3c\n", environ={})
    shown = repr(config)
    assert "t0p" not in shown
    assert "s3c" not in shown
    assert "token=***" in shown
    assert "secret=***" in shown
    assert config.admin.token == "t0p"


# -- rule errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            "- key: 'agent-api-key-{{ .Request.Header.X-API-Key }}'\n"
            "  capacity: 5\n  refilRate: 1\n",
            "bucketmesh.yaml: rule 1 (agent-api-key): refilRate is not a known field "
            "(did you mean refillRate?)",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: 0, refillRate: 1}\n",
            "bucketmesh.yaml: rule 1 (a): capacity must be >= 1, got 0",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: 2.5, refillRate: 1}\n",
            "bucketmesh.yaml: rule 1 (a): capacity: expected an integer, got 2.5",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: lots, refillRate: 1}\n",
            "bucketmesh.yaml: rule 1 (a): capacity: expected an integer, got 'lots'",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: 1, refillRate: 0}\n",
            "bucketmesh.yaml: rule 1 (a): refillRate must be > 0, got 0",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: 1, refillRate: .inf}\n",
            "bucketmesh.yaml: rule 1 (a): refillRate must be finite, got inf",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: 1, refill_rate: -2}\n",
            "bucketmesh.yaml: rule 1 (a): refill_rate must be > 0, got -2",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: 1, refillRate: 1, ttl: 0}\n",
            "bucketmesh.yaml: rule 1 (a): ttl must be > 0, got 0",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: 1, refillRate: 1, mode: fast}\n",
            "bucketmesh.yaml: rule 1 (a): mode must be shared, strict or local, got 'fast'",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', rate: 1/s, onStoreFailure: panic}\n",
            "bucketmesh.yaml: rule 1 (a): onStoreFailure must be allow, deny or local, got 'panic'",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', rate: 1/s, onStoreFailure: deny, "
            "on_store_failure: allow}\n",
            "bucketmesh.yaml: rule 1 (a): on_store_failure cannot be given with onStoreFailure; "
            "they are the same",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: 1, refillRate: 1, refill_rate: 1}\n",
            "bucketmesh.yaml: rule 1 (a): refill_rate cannot be given with refillRate; "
            "they are the same",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', rate: 100/minute, refillRate: 1}\n",
            "bucketmesh.yaml: rule 1 (a): rate cannot be combined with refillRate; "
            "give one of them",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', rate: 100/fortnight}\n",
            "bucketmesh.yaml: rule 1 (a): rate: invalid rate '100/fortnight': unknown unit "
            "'fortnight'; use second, minute, hour or day",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', rate: 100}\n",
            "bucketmesh.yaml: rule 1 (a): rate: expected a string, got 100",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}'}\n",
            "bucketmesh.yaml: rule 1 (a): needs capacity and refillRate, or a rate such as "
            '"100/minute"',
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', refillRate: 1}\n",
            "bucketmesh.yaml: rule 1 (a): capacity is required with refillRate "
            "(or give a rate instead)",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', capacity: 1}\n",
            "bucketmesh.yaml: rule 1 (a): refillRate is required with capacity "
            "(tokens per second), or give a rate instead",
        ),
        (
            "- {capacity: 1, refillRate: 1}\n",
            "bucketmesh.yaml: rule 1 (rule-1): key is required",
        ),
        (
            "- {name: x, key: 5, capacity: 1, refillRate: 1}\n",
            "bucketmesh.yaml: rule 1 (x): key: expected a string, got 5",
        ),
        (
            "- {key: 'a-{{ .Request.Foo }}', capacity: 1, refillRate: 1}\n",
            "bucketmesh.yaml: rule 1 (rule-1): key: unknown placeholder {{ .Request.Foo }} in "
            "key template 'a-{{ .Request.Foo }}'; use {{ .Request.Header.NAME }}, "
            "{{ .Request.Query.NAME }} or {{ .Request.ClientIP }}",
        ),
        (
            "- {name: per ip, key: 'a-{{ .Request.ClientIP }}', rate: 1/s}\n",
            "bucketmesh.yaml: rule 1 (per ip): name must be 1-128 letters, digits, '_', '-', "
            "'.' or ':' starting with a letter, digit or '_', got 'per ip'",
        ),
        (
            "- just-a-string\n",
            "bucketmesh.yaml: rule 1 (rule-1): expected a mapping with key and "
            "capacity/refillRate or rate, got 'just-a-string'",
        ),
        (
            "- {name: per-ip, key: 'a-{{ .Request.ClientIP }}', rate: 1/s}\n"
            "- {name: per-ip, key: 'b-{{ .Request.ClientIP }}', rate: 1/s}\n",
            "bucketmesh.yaml: rule 2 (per-ip): name: 'per-ip' is already the name of rule 1",
        ),
        (
            "- {key: 'a-{{ .Request.ClientIP }}', rate: 1/s}\n"
            "- {name: b, key: 'a-{{ .Request.ClientIP }}', rate: 2/s}\n",
            "bucketmesh.yaml: rule 2 (b): key is the same template as rule 1 (a); "
            "their bucket keys would collide",
        ),
    ],
)
def test_invalid_rule_names_rule_number_name_field_and_value(rules: str, message: str) -> None:
    assert rule_error(rules) == message


def test_rule_error_carries_its_parts_and_numbers_from_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "buckets.yaml",
        """\
        - key: "agent-api-key-{{ .Request.Header.X-API-Key }}"
          capacity: 5000
          refillRate: 50
        - name: per-ip
          key: "ip-{{ .Request.ClientIP }}"
          capacity: 100
          refillRate: -5
        """,
    )
    with pytest.raises(ConfigError) as raised:
        load_buckets(path)
    error = raised.value
    assert str(error) == f"{path}: rule 2 (per-ip): refillRate must be > 0, got -5"
    assert (error.file, error.rule, error.rule_name, error.field) == (
        path,
        2,
        "per-ip",
        "refillRate",
    )
    assert error.message == "must be > 0, got -5"


def test_file_is_named_as_the_user_gave_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "buckets.yaml", "- {key: 'x', capacity: 1, refillRate: -5}\n")
    with pytest.raises(ConfigError) as raised:
        load_buckets("buckets.yaml")
    assert str(raised.value) == "buckets.yaml: rule 1 (x): refillRate must be > 0, got -5"


# -- rules: names, rate shorthand, aliases --------------------------------------------


def test_rule_names_derive_from_keys_and_are_made_unique() -> None:
    config = parse_config(
        textwrap.dedent(
            """\
            buckets:
              - {key: "api-{{ .Request.Header.X-A }}", rate: 1/s}
              - {key: "api-{{ .Request.Header.X-B }}", rate: 1/s}
              - {key: "{{ .Request.ClientIP }}", rate: 1/s}
              - {name: api-3, key: "z-{{ .Request.Query.q }}", rate: 1/s}
              - {key: "api-{{ .Request.Query.c }}", rate: 1/s}
            """
        ),
        environ={},
    )
    assert [rule.name for rule in config.buckets] == ["api", "api-2", "rule-3", "api-3", "api-4"]


def test_rate_with_capacity_sets_a_burst_above_the_rate() -> None:
    config = parse_config(
        "buckets:\n  - {key: 'k-{{ .Request.ClientIP }}', rate: 100/minute, capacity: 300}\n",
        environ={},
    )
    (rule,) = config.buckets
    assert rule.capacity == 300
    assert rule.refill_rate == pytest.approx(100 / 60)


def test_snake_case_refill_rate_and_store_failure_are_accepted() -> None:
    config = parse_config(
        "buckets:\n  - {key: k, capacity: 3, refill_rate: 2, on_store_failure: deny}\n",
        environ={},
    )
    (rule,) = config.buckets
    assert (rule.capacity, rule.refill_rate, rule.on_store_failure) == (3, 2.0, "deny")


def test_quoted_numbers_are_accepted() -> None:
    config = parse_config("buckets:\n  - {key: k, capacity: '3', refillRate: '0.5'}\n", environ={})
    assert (config.buckets[0].capacity, config.buckets[0].refill_rate) == (3, 0.5)


# -- separate buckets files ----------------------------------------------------------


def test_buckets_may_be_a_path_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", "rules.yaml", "- {key: 'ip-{{ .Request.ClientIP }}', rate: 5/s}\n")
    path = write(tmp_path / "conf", "bucketmesh.yaml", "buckets: rules.yaml\n")
    config = load_config(path, environ={})
    assert config.buckets_path == str(tmp_path / "conf" / "rules.yaml")
    assert [(rule.name, rule.capacity) for rule in config.buckets] == [("ip", 5)]


def test_errors_in_a_referenced_buckets_file_name_that_file(tmp_path: Path) -> None:
    write(tmp_path, "rules.yaml", "- {key: 'ip-{{ .Request.ClientIP }}', rate: 5/fortnight}\n")
    path = write(tmp_path, "bucketmesh.yaml", "buckets: rules.yaml\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    assert raised.value.file == str(tmp_path / "rules.yaml")
    assert raised.value.rule == 1
    assert raised.value.field == "rate"


def test_buckets_file_may_be_a_mapping_with_buckets(tmp_path: Path) -> None:
    path = write(tmp_path, "buckets.yaml", "buckets:\n  - {key: k, rate: 1/s}\n")
    assert [rule.name for rule in load_buckets(path)] == ["k"]


def test_buckets_file_mapping_takes_nothing_else(tmp_path: Path) -> None:
    path = write(tmp_path, "buckets.yaml", "rules:\n  - {key: k, rate: 1/s}\n")
    with pytest.raises(ConfigError) as raised:
        load_buckets(path)
    assert str(raised.value) == (
        f"{path}: rules is not a known field; a buckets file is a list of rules "
        "or a mapping with just buckets:"
    )


def test_empty_buckets_file_has_no_rules(tmp_path: Path) -> None:
    assert load_buckets(write(tmp_path, "buckets.yaml", "# nothing yet\n")) == []


def test_buckets_file_must_hold_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, "buckets.yaml", "just text\n")
    with pytest.raises(ConfigError) as raised:
        load_buckets(path)
    assert str(raised.value) == f"{path}: buckets: expected a list of rules, got 'just text'"


# -- ${VAR} substitution -------------------------------------------------------------


def test_environment_variables_are_substituted() -> None:
    config = parse_config(
        textwrap.dedent(
            """\
            region: ${REGION}
            listen: ${HOST:-127.0.0.1}:${PORT:-9090}
            admin:
              token: "Bearer-${TOKEN}"
            limits:
              maxBuckets: ${MAX:-500}
            sync:
              enabled: ${SYNC:-false}
            buckets:
              - {key: "${PREFIX}-{{ .Request.ClientIP }}", capacity: "${CAP}", refillRate: 1}
            """
        ),
        environ={"REGION": "eu-west-1", "PORT": "", "TOKEN": "t", "PREFIX": "p", "CAP": "7"},
    )
    assert config.region == "eu-west-1"
    assert config.listen == "127.0.0.1:9090"
    assert config.admin.token == "Bearer-t"
    assert config.limits.max_buckets == 500
    assert config.sync.enabled is False
    (rule,) = config.buckets
    assert (rule.name, rule.key, rule.capacity) == ("p", "p-{{ .Request.ClientIP }}", 7)


def test_set_but_empty_variable_is_used_as_is_without_a_default() -> None:
    config = parse_config("admin:\n  token: ${TOKEN}\n", environ={"TOKEN": ""})
    assert config.admin.token is None


def test_double_dollar_escapes_a_substitution() -> None:
    config = parse_config("admin:\n  token: 'pa$$w$${HOME}'\n", environ={})
    assert config.admin.token == "pa$$w${HOME}"


def test_unset_variable_names_file_field_and_variable() -> None:
    error = config_error("sync:\n  secret: ${BUCKETMESH_SYNC_SECRET}\n")
    assert str(error) == (
        "bucketmesh.yaml: sync.secret: environment variable BUCKETMESH_SYNC_SECRET is not set "
        "(set it, or give a default: ${BUCKETMESH_SYNC_SECRET:-default})"
    )
    assert error.field == "sync.secret"


def test_unset_variable_in_a_rule_names_the_rule() -> None:
    assert rule_error("- {key: k, capacity: '${CAP}', refillRate: 1}\n") == (
        "bucketmesh.yaml: rule 1: capacity: environment variable CAP is not set "
        "(set it, or give a default: ${CAP:-default})"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${}", "bad substitution '${}'; use ${NAME} or ${NAME:-default}"),
        ("${1X}", "bad substitution '${1X}'; use ${NAME} or ${NAME:-default}"),
        ("${X:default}", "bad substitution '${X:default}'; use ${NAME} or ${NAME:-default}"),
        ("a${X", "unclosed '${' in 'a${X'"),
    ],
)
def test_malformed_substitution(value: str, message: str) -> None:
    assert str(config_error(f"node: '{value}'\n")) == f"bucketmesh.yaml: node: {message}"


# -- overrides -----------------------------------------------------------------------


def test_env_overrides_map_variables_to_dotted_keys() -> None:
    environ = {
        "BUCKETMESH_LISTEN": ":9000",
        "BUCKETMESH_REGION": "eu-west-1",
        "BUCKETMESH_ADMIN_TOKEN": "tok",
        "BUCKETMESH_SYNC_SECRET": "sec",
        "BUCKETMESH_STORAGE_BACKEND": "redis",
        "BUCKETMESH_CONFIG": "ignored.yaml",
        "PATH": "/bin",
    }
    assert env_overrides(environ) == {
        "listen": ":9000",
        "region": "eu-west-1",
        "admin.token": "tok",
        "sync.secret": "sec",
        "storage.backend": "redis",
    }
    assert ENV_OVERRIDES["BUCKETMESH_SYNC_CLUSTER_ID"] == "sync.sync_cluster_id"


def test_overrides_are_converted_and_leave_the_original_alone() -> None:
    base = parse_config("buckets:\n  - {key: k, rate: 1/s}\n", environ={})
    config = apply_overrides(
        base,
        {
            "listen": "[::]:9000",
            "region": "eu-west-1",
            "sync.enabled": "yes",
            "sync.secret": "sec",
            "sync.peers": "eu-west-1, us-east-1 ,",
            "sync.peer_urls": "us-east-1=http://10.0.0.1:8080",
            "sync.interval": "50",
            "storage.redisUrl": "redis://r:6379/1",
            "storage.backend": "redis",
            "limits.max_buckets": "10",
            "admin.token": "tok",
        },
    )
    assert (config.listen_host, config.listen_port) == ("::", 9000)
    assert config.region == "eu-west-1"
    assert config.sync.enabled is True
    assert config.sync.peers == ("eu-west-1", "us-east-1")
    assert config.remote_peers == {"us-east-1": "http://10.0.0.1:8080"}
    assert config.sync.interval_ms == 50
    assert (config.storage.backend, config.storage.redis_url) == ("redis", "redis://r:6379/1")
    assert config.limits.max_buckets == 10
    assert config.admin.token == "tok"
    assert config.buckets == base.buckets
    assert base.listen == "127.0.0.1:8080"
    assert base.sync.enabled is False


def test_override_peer_url_template_replaces_the_file_urls() -> None:
    base = parse_config(
        "region: a\nsync:\n  peers: [a, b]\n  peerUrls: {b: 'http://old:1'}\n", environ={}
    )
    config = apply_overrides(
        base,
        {"sync.peer_urls": "http://mesh-{region}:8080", "sync.enabled": "on", "sync.secret": "s"},
    )
    assert config.sync.peer_urls == {}
    assert config.remote_peers == {"b": "http://mesh-b:8080"}


def test_empty_override_clears_an_optional_setting() -> None:
    base = parse_config("admin:\n  token: t\n", environ={})
    assert apply_overrides(base, {"admin.token": ""}).admin.token is None


def test_override_errors_name_the_flag_or_variable() -> None:
    base = Config()
    origin = {key: var for var, key in ENV_OVERRIDES.items()}
    with pytest.raises(ConfigError) as raised:
        apply_overrides(base, {"storage.backend": "disk"}, origin=origin)
    assert str(raised.value) == (
        "BUCKETMESH_STORAGE_BACKEND: storage.backend must be memory or redis, got 'disk'"
    )
    with pytest.raises(ConfigError) as raised:
        apply_overrides(base, {"listen": "nowhere"}, origin={"listen": "--listen"})
    assert str(raised.value) == (
        "--listen: listen: expected host:port such as 0.0.0.0:8080, :8080 or [::1]:8080, "
        "got 'nowhere'"
    )
    with pytest.raises(ConfigError) as raised:
        apply_overrides(base, {"limits.max_buckets": "many"})
    assert str(raised.value) == (
        "override limits.max_buckets: limits.maxBuckets: expected an integer, got 'many'"
    )
    with pytest.raises(ConfigError) as raised:
        apply_overrides(base, {"sync.enabled": "maybe"})
    assert str(raised.value) == (
        "override sync.enabled: sync.enabled: expected true or false, got 'maybe'"
    )


def test_unknown_override_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as raised:
        apply_overrides(Config(), {"storage.backnd": "redis"}, origin={"storage.backnd": "--x"})
    assert str(raised.value) == (
        "--x: storage.backnd is not a known setting (did you mean storage.backend?)"
    )
    with pytest.raises(ConfigError) as raised:
        apply_overrides(Config(), {"sync": "x"})
    assert str(raised.value).startswith("override sync: sync is not a known setting")


def test_a_combination_error_after_overrides_names_the_config_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "bucketmesh.yaml",
        "region: a\nsync:\n  peers: [a, b]\n  peerUrls: {a: 'http://a'}\n",
    )
    base = load_config(path, environ={})
    with pytest.raises(ConfigError) as raised:
        apply_overrides(base, {"sync.enabled": "true", "sync.secret": "s"})
    assert raised.value.file == path
    assert raised.value.field == "sync.peerUrls"


def test_buckets_override_loads_a_buckets_file(tmp_path: Path) -> None:
    path = write(tmp_path, "b.yaml", "- {key: 'z-{{ .Request.Query.u }}', rate: 2/s}\n")
    config = apply_overrides(Config(), {"buckets": path})
    assert config.buckets_path == path
    assert [(rule.name, rule.capacity) for rule in config.buckets] == [("z", 2)]


# -- what a Kubernetes operator keeps outside the file (issue 13) -------------------

SYNC_SNIPPET = """\
region: us-east-1
listen: 127.0.0.1:8080
sync:
  enabled: true
  syncClusterId: "global-rate-limit-cluster"
  peers:
    - "us-east-1"
    - "us-west-2"
    - "eu-central-1"
"""


def test_the_environment_gives_the_secret_a_file_with_sync_enabled_lacks(tmp_path: Path) -> None:
    # The file sets sync.enabled without a secret: BUCKETMESH_SYNC_SECRET still counts
    # (the environment beats the file), it is not refused before the variable is read.
    path = write(tmp_path, "bucketmesh.yaml", SYNC_SNIPPET)
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    assert raised.value.field == "sync.secret"
    assert "BUCKETMESH_SYNC_SECRET" in str(raised.value)
    base = load_config(path, environ={}, complete=False)
    config = apply_overrides(base, env_overrides({"BUCKETMESH_SYNC_SECRET": "from-env"}))
    assert config.sync.secret == "from-env"


def test_the_secret_comes_from_a_mounted_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("mounted-secret\n")
    path = write(tmp_path, "bucketmesh.yaml", SYNC_SNIPPET + f"  secretFile: {secret}\n")
    assert load_config(path, environ={}).sync.secret == "mounted-secret"
    # ... or from BUCKETMESH_SYNC_SECRET_FILE; and BUCKETMESH_SYNC_SECRET beats the file's
    base = load_config(write(tmp_path, "b.yaml", SYNC_SNIPPET), environ={}, complete=False)
    by_env = env_overrides({"BUCKETMESH_SYNC_SECRET_FILE": str(secret)})
    assert apply_overrides(base, by_env).sync.secret == "mounted-secret"
    with_file = load_config(path, environ={}, complete=False)
    by_var = env_overrides({"BUCKETMESH_SYNC_SECRET": "from-env"})
    assert apply_overrides(with_file, by_var).sync.secret == "from-env"
    secret.write_text("")
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    assert (raised.value.field, raised.value.file) == ("sync.secretFile", path)


def test_peer_urls_default_to_one_service_per_region_on_this_nodes_port(tmp_path: Path) -> None:
    path = write(tmp_path, "bucketmesh.yaml", SYNC_SNIPPET + "  secret: s\n")
    config = load_config(path, environ={})
    assert config.sync.peer_url_template == DEFAULT_PEER_URL_TEMPLATE.replace("{port}", "8080")
    assert config.remote_peers == {
        "us-west-2": "http://bucketmesh-us-west-2:8080",
        "eu-central-1": "http://bucketmesh-eu-central-1:8080",
    }


CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: openclaw-config
data:
  buckets.yaml: |
    buckets:
      - key: "agent\u2011api\u2011key-{{ .Request.Header.X-API-Key }}"
        capacity: 5000
        refillRate: 50
        ttl: 3600
"""


def test_rules_are_read_from_a_config_maps_buckets_yaml(tmp_path: Path) -> None:
    write(tmp_path, "openclaw-config.yaml", CONFIG_MAP)
    path = write(tmp_path, "bucketmesh.yaml", "buckets: openclaw-config.yaml\n")
    (rule,) = load_config(path, environ={}).buckets
    assert (rule.key, rule.capacity, rule.refill_rate) == (
        "agent\u2011api\u2011key-{{ .Request.Header.X-API-Key }}",
        5000,
        50.0,
    )
    assert rule.template.shown_name == "agent\u2011api\u2011key"


def test_a_config_map_without_buckets_yaml_or_given_as_the_config_is_named(
    tmp_path: Path,
) -> None:
    cm = write(tmp_path, "cm.yaml", CONFIG_MAP.replace("buckets.yaml: |", "other.yaml: |"))
    with pytest.raises(ConfigError) as raised:
        load_buckets(cm)
    assert str(raised.value) == (
        f'{cm}: data."buckets.yaml" is required: this ConfigMap holds no rules there '
        '(its data has "other.yaml")'
    )
    bad = write(tmp_path, "bad.yaml", CONFIG_MAP.replace("capacity: 5000", "capacity: -1"))
    with pytest.raises(ConfigError) as raised:
        load_buckets(bad)
    assert str(raised.value).startswith(f'{bad}: data."buckets.yaml": rule 1 (agent-api-key): ')
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, "c.yaml", CONFIG_MAP), environ={})
    assert raised.value.field == "kind"
    assert "give its file as buckets:" in str(raised.value)


def test_default_state_key_is_a_setting_with_a_variable() -> None:
    config = parse_config('defaultStateKey: "ip-{{ .Request.ClientIP }}"\n', environ={})
    assert config.default_state_key == "ip-{{ .Request.ClientIP }}"
    overridden = apply_overrides(
        config, env_overrides({"BUCKETMESH_DEFAULT_STATE_KEY": "anonymous"})
    )
    assert overridden.default_state_key == "anonymous"


# -- strict mode's shares need one token per region ----------------------------------

STRICT_MESH = """\
region: a
sync:
  enabled: true
  syncClusterId: c
  peers: [a, b, c]
  peerUrlTemplate: "http://bucketmesh-{region}:8080"
  secret: s
"""
STRICT_RULE = '  - {key: "k-{{ .Request.ClientIP }}", capacity: 2, refillRate: 1, mode: strict}\n'


def test_a_strict_rule_below_one_token_per_region_is_a_config_error() -> None:
    error = config_error(STRICT_MESH + "buckets:\n" + STRICT_RULE)
    assert str(error) == (
        "bucketmesh.yaml: rule 1 (k): capacity must be >= the number of regions "
        "(3: a, b, c) in strict mode, got 2: each region holds a share of at least one token"
    )
    # one region fewer (or no mesh) and the same rule is fine
    two = STRICT_MESH.replace("[a, b, c]", "[a, b]") + "buckets:\n" + STRICT_RULE
    assert parse_config(two, environ={}).buckets[0].capacity == 2
    alone = "region: a\nbuckets:\n" + STRICT_RULE
    assert parse_config(alone, environ={}).regions == ("a",)


def test_the_strict_capacity_error_names_the_buckets_file_and_counts_late_peers(
    tmp_path: Path,
) -> None:
    rules = write(
        tmp_path, "rules.yaml", "- {key: x, capacity: 5, refillRate: 1}\n" + STRICT_RULE[2:]
    )
    path = write(tmp_path, "c.yaml", STRICT_MESH.replace("[a, b, c]", "[a, b]"))
    config = apply_overrides(load_config(path, complete=False), {"buckets": rules})
    assert config.buckets[1].mode == "strict"  # 2 regions: 1 token each
    with pytest.raises(ConfigError) as raised:  # the third region comes from a flag
        apply_overrides(config, {"sync.peers": "a,b,c"}, origin={"sync.peers": "--peers"})
    assert (raised.value.file, raised.value.rule, raised.value.field) == (rules, 2, "capacity")


def test_load_limiter_leaves_the_mesh_to_the_node(tmp_path: Path) -> None:
    """``load_limiter`` takes a serving node's config for its rules; the strict check
    against the mesh's regions is the limiter's, for the ``regions`` it is given."""
    from bucketmesh.node.config import load_limiter

    path = write(tmp_path, "c.yaml", STRICT_MESH + "buckets:\n" + STRICT_RULE)
    limiter = load_limiter(path, replica_id="a/n/1", regions=1)
    assert limiter.rules[0].capacity == 2
    with pytest.raises(ValueError, match="strict mode needs capacity >= regions"):
        load_limiter(path, replica_id="a/n/1")


def test_serve_exits_2_naming_the_rule_not_the_state(tmp_path: Path) -> None:
    """Before, the limiter's ValueError surfaced while opening the state and serve
    printed "unreadable snapshot or write-ahead log"."""
    path = write(tmp_path, "c.yaml", STRICT_MESH + "buckets:\n" + STRICT_RULE)
    done = subprocess.run(
        [sys.executable, "-m", "bucketmesh", "serve", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert f"config error: {path}: rule 1 (k): capacity must be >= " in done.stderr
    assert "snapshot" not in done.stderr


# -- settings that each look valid but cannot work together ----------------------------


@pytest.mark.parametrize(
    ("text", "field", "other"),
    [
        ("listen: 127.0.0.1:8080\nenvoyListen: 0.0.0.0:8080\n", "envoyListen", "listen"),
        ("listen: :8080\nadminListen: 127.0.0.1:8080\n", "adminListen", "listen"),
        (
            "listen: :8080\nadminListen: :9000\nenvoyListen: 127.0.0.1:9000\n",
            "envoyListen",
            "adminListen",
        ),
    ],
)
def test_two_listeners_on_one_port_are_a_config_error(text: str, field: str, other: str) -> None:
    """Before, envoyListen on the API's port got past the config and serve exited 1
    with "address already in use" after the main listener was already up."""
    error = config_error(text)
    assert error.field == field
    assert f"must be another port than {other} " in str(error)
    # port 0 (a free port) may repeat, and so may a port on two different addresses
    parse_config("listen: :0\nenvoyListen: :0\nadminListen: :0\n", environ={})
    parse_config("listen: 10.0.0.5:8080\nenvoyListen: 127.0.0.1:8080\n", environ={})


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('admin: {tokenFile: "a\\0b"}\n', "admin.tokenFile"),
        ('storage: {snapshot: "/tmp/x\\0y"}\n', "storage.snapshot"),
        ('buckets: "a\\0b"\n', "buckets"),
        ('audit: {enabled: true, path: "/tmp/a\\0b"}\n', "audit.path"),
    ],
)
def test_a_nul_byte_in_a_setting_is_a_config_error_naming_it(text: str, field: str) -> None:
    """Before, a path holding NUL raised ValueError ("embedded null byte") from deep in
    start-up: a traceback and exit 1."""
    error = config_error(text)
    assert "contains a NUL byte" in str(error)
    assert error.field == field


def test_an_audit_trail_over_the_state_files_is_a_config_error(tmp_path: Path) -> None:
    """Before, audit.path equal to storage.snapshot was accepted: the trail rotated the
    snapshot away and the next start failed with "unreadable snapshot"."""
    snap = tmp_path / "state.snap"
    for path in (snap, f"{snap}.wal.1", f"{snap}.idempotency"):
        error = config_error(
            f"storage: {{snapshot: {snap}}}\naudit: {{enabled: true, path: {path}}}\n"
        )
        assert error.field == "audit.path" and "must not be storage.snapshot" in str(error)
    # the trail's rotations (audit.path.1, ...) must not be the snapshot either
    error = config_error(
        f"storage: {{snapshot: {snap}.1}}\naudit: {{enabled: true, path: {snap}}}\n"
    )
    assert error.field == "audit.path"
    fine = parse_config(
        f"storage: {{snapshot: {snap}}}\naudit: {{enabled: true, path: {tmp_path}/audit.log}}\n",
        environ={},
    )
    assert fine.audit.path == f"{tmp_path}/audit.log"
    # a trail named like the snapshot's stem writes none of its files (x, x.1, ...)
    stem = tmp_path / "state"
    text = f"storage: {{snapshot: {stem}.snap}}\naudit: {{enabled: true, path: {stem}}}\n"
    assert parse_config(text, environ={}).audit.path == str(stem)


def test_an_empty_buckets_variable_is_named() -> None:
    """Before: 'config error: : cannot read the file', naming neither file nor variable."""
    with pytest.raises(ConfigError) as raised:
        apply_overrides(Config(), {"buckets": ""}, origin={"buckets": "BUCKETMESH_BUCKETS"})
    assert str(raised.value) == (
        "BUCKETMESH_BUCKETS: buckets is empty: give the path of a buckets file, or unset it"
    )

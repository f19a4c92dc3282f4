"""An Envoy bootstrap limited by bucketmesh, for the tests and benchmarks/envoy.py
(README "Envoy" shows its core)."""

from __future__ import annotations

import json
from typing import Any


def envoy_bootstrap(
    listen_port: int,
    upstream_port: int,
    rls_port: int,
    admin_port: int,
    *,
    domain: str,
    header: str,
    host: str = "127.0.0.1",
) -> str:
    """A complete Envoy bootstrap (YAML) limited by bucketmesh: a listener on
    ``listen_port`` proxying to ``upstream_port``, the ratelimit HTTP filter
    (``domain``, one descriptor ``(header, value)`` per request carrying
    ``header``) calling the service on ``rls_port``, the admin on ``admin_port``.
    Used by the tests and benchmarks/envoy.py; README "Envoy" shows its core."""

    def cluster(name: str, port: int, http2: bool = False) -> dict[str, Any]:
        address = {"socket_address": {"address": host, "port_value": port}}
        found: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
        }
        if http2:  # gRPC
            options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            found["typed_extension_protocol_options"] = {
                options: {
                    "@type": f"type.googleapis.com/{options}",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return found

    manager = "envoy.extensions.filters.network.http_connection_manager.v3"
    connection_manager = {
        "@type": f"type.googleapis.com/{manager}.HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                    "rate_limits": [
                        {
                            "actions": [
                                {
                                    "request_headers": {
                                        "header_name": header,
                                        "descriptor_key": header,
                                    }
                                }
                            ]
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                    "domain": domain,
                    # no answer from bucketmesh: deny (a test then sees it)
                    "failure_mode_deny": True,
                    "timeout": "2s",
                    "rate_limit_service": {
                        "transport_api_version": "V3",
                        "grpc_service": {"envoy_grpc": {"cluster_name": "bucketmesh"}},
                    },
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    config = {
        "admin": {"address": {"socket_address": {"address": host, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": host, "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": connection_manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("upstream", upstream_port),
                cluster("bucketmesh", rls_port, http2=True),
            ],
        },
    }
    return json.dumps(config, indent=1)  # JSON is YAML; no yaml dependency here

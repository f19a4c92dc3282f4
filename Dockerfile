# syntax=docker/dockerfile:1
# The bucketmesh node image: `docker build -t bucketmesh .` (docs/deploy.md).
#
# Stage 1 builds the wheel from this checkout, with the decision core, the HTTP
# hot path and the heap helper compiled (mypyc, Cython, C: docs/build.md), and
# installs it, with its dependencies, into a virtualenv; it runs on the full
# Python image, which has gcc and the headers. Stage 2 is the slim image of the
# same Python and Debian with only that virtualenv: no checkout, no compiler, no
# pip cache. The node runs as an
# unprivileged user with its state (snapshot + write-ahead log) on a volume, and
# SIGTERM stops it gracefully: it stops accepting, finishes the requests in
# flight, sends the deltas still queued and writes a final snapshot.
# tests/test_deploy_pods.py runs this image's ENTRYPOINT + CMD from a wheel in a
# fresh venv against the Helm chart's rendered config; hadolint lints this file.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# the same Python and Debian as PYTHON_IMAGE, with a C compiler (change them together)
ARG BUILD_IMAGE=python:3.12-bookworm

FROM ${BUILD_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md setup.py ./
COPY src ./src
# The wheel is built without isolation in a build venv (/build) holding the pinned
# build tools (mypyc type-checks what the core imports: PyYAML's stubs too) and the
# package's runtime dependencies (from a first, pure install of the checkout), so that
# setup.py finds mypyc and Cython and mypyc can type-check the core against msgspec
# and the rest. The build fails rather than ship the pure-Python
# core, which setup.py falls back to without them or without a compiler.
RUN python -m venv /build \
 && /build/bin/pip install 'setuptools==84.2.1' 'wheel==0.48.0' 'mypy==2.4.1' 'Cython==3.3.1' \
      'types-PyYAML==6.0.12.20261122' \
 && /build/bin/pip install . \
 && /build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /dist . \
 && python -m venv /opt/bucketmesh \
 && /opt/bucketmesh/bin/pip install /dist/bucketmesh-*.whl \
 && /opt/bucketmesh/bin/python -c "from bucketmesh import _native; from bucketmesh.core import heap; assert _native.compiled() and _native.compiled_http() and heap.COMPILED, 'the core was not compiled'" \
 && /opt/bucketmesh/bin/python -m compileall -q /opt/bucketmesh/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="bucketmesh" \
      org.opencontainers.image.description="Geo-replicated token-bucket rate limiter (Rating API, Envoy RLS, sync mesh)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 bucketmesh \
 && useradd --system --uid 10001 --gid bucketmesh --no-create-home \
      --home-dir /var/lib/bucketmesh --shell /usr/sbin/nologin bucketmesh \
 && mkdir -p /var/lib/bucketmesh /etc/bucketmesh \
 && chown bucketmesh:bucketmesh /var/lib/bucketmesh
COPY --from=build /opt/bucketmesh /opt/bucketmesh
COPY deploy/docker/bucketmesh.yaml /etc/bucketmesh/bucketmesh.yaml
# the root filesystem may be read-only (the chart makes it so): nothing writes bytecode
ENV PATH=/opt/bucketmesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/bucketmesh
VOLUME ["/var/lib/bucketmesh"]
# 8080: the Rating API, /v1/sync/*, /healthz, /readyz and /metrics;
# 8081: the Envoy rate limit service (gRPC), when envoyListen is set;
# 8090: the reserved listener (sync and admin only, never shed), when adminListen is
# set (the Helm chart sets it with sync enabled and points the sync Service at it)
EXPOSE 8080 8081 8090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["bucketmesh"]
CMD ["serve", "--config", "/etc/bucketmesh/bucketmesh.yaml"]

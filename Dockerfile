# syntax=docker/dockerfile:1
# repairy-gateway container image (Python 3.11 on Debian bookworm, as the tests run).
#   docker build -t repairy-gateway .
# Pin the base by digest where a registry is reachable (look it up, never invent it):
#   docker buildx imagetools inspect python:3.11.11-slim-bookworm   # -> Digest: sha256:...
#   docker build --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:<digest> .
# The proxy listens on 127.0.0.1 inside the container (the safe default, for a sidecar). To
# publish it, listen on all interfaces and require client keys:
#   docker run --read-only -p 8080:8080 -v gw-state:/var/lib/repairy-gateway \
#     -e GATEWAY_LISTEN=0.0.0.0:8080 -e GATEWAY_CLIENT_KEYS=me=<a long random key> \
#     -e REPAIRY_BASE_URL=... -e REPAIRY_APP_KEY_FILE=... repairy-gateway
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: install the package into a self-contained virtualenv --------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies from the lock file, every one checked against its hash; then the package alone.
COPY pyproject.toml README.md requirements.lock ./
COPY gateway ./gateway
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-compile --require-hashes -r requirements.lock \
 && /opt/venv/bin/pip install --no-compile --no-deps . \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# --- runtime: no compilers, no build tools, non-root ----------------------------------------
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="repairy-gateway" \
      org.opencontainers.image.description="Credential-injecting gateway for the Repairy Partner API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/repairy-gateway/repairy-gateway"
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway \
 && mkdir -p /var/lib/repairy-gateway \
 && chown 10001:10001 /var/lib/repairy-gateway \
 && chmod 0700 /var/lib/repairy-gateway
COPY --from=build /opt/venv /opt/venv
# The proxy listens on loopback by default (sidecar); admin must answer kubelet probes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:9091
# The only place the gateway writes (GATEWAY_TOKEN_FILE); the root filesystem can be read-only.
VOLUME ["/var/lib/repairy-gateway"]
USER 10001:10001
EXPOSE 8080 9091
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/opt/venv/bin/python", "-m", "gateway.healthcheck"]
ENTRYPOINT ["/opt/venv/bin/repairy-gateway"]
CMD ["serve"]

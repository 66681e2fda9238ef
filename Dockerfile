# syntax=docker/dockerfile:1
#
# recap: a multi-stage build. The builder compiles the release binary; the runtime image is debian:bookworm-slim with
# only CA certificates, the binary and a healthcheck script, running as the non-root user `recap` (uid/gid 10001).
#
#   docker build -t recap .
#   docker run --rm -e NATS_URL=... -e DATABASE_URL=... -e QDRANT_URL=... -p 127.0.0.1:9464:9464 recap
#   docker run --rm -e DATABASE_URL=... recap migrate      # any subcommand: check, status --json, migrate, retry
#
# Needs BuildKit (the default builder of current Docker): cache mounts and the heredoc below.

# ---------------------------------------------------------------------------------------------------- build
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Only what the binary is built from (see .dockerignore). nats/ is compiled in (stream.json, consumer.json),
# migrations/ too (sqlx::migrate!); benches/ is not built, but Cargo.toml declares [[bench]] targets and cargo refuses
# a manifest whose declared targets are missing.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY src ./src
COPY migrations ./migrations
COPY nats ./nats
# Strip symbols from the release binary without touching Cargo.toml's profile.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
# The commit shown as recap_build_info{git=...} on /metrics (.git is not in the build context):
#   docker build --build-arg RECAP_GIT_COMMIT=$(git rev-parse --short HEAD) .
ARG RECAP_GIT_COMMIT=unknown
# The registry and target directory live in cache mounts, so a rebuild after a source change recompiles only recap.
# The binary is copied out of the cache mount (which is not part of the image layer).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin recap \
 && install -D -m 0755 target/release/recap /out/recap

# ---------------------------------------------------------------------------------------------------- runtime
FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to the LLM endpoint, and to NATS/Postgres/Qdrant when they use TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 recap \
 && useradd --system --uid 10001 --gid recap --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin recap

COPY --from=build /out/recap /usr/local/bin/recap

# The image has no curl: the healthcheck speaks HTTP/1.0 over bash's /dev/tcp. It asks /healthz (the process is
# alive and serving), not /readyz: a dependency outage must not get a healthy recap restarted; /readyz is for load
# balancers and alerts. tests/ops.rs runs this script against a live recap.
COPY --chmod=0755 <<'EOF' /usr/local/bin/recap-healthcheck
#!/bin/bash
# Exit 0 when GET /healthz on HTTP_ADDR answers 200.
set -u
addr=${HTTP_ADDR:-127.0.0.1:9464}
port=${addr##*:}
host=${addr%:*}
host=${host#[}
host=${host%]}
case $host in "" | 0.0.0.0 | ::) host=127.0.0.1 ;; esac
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3 || exit 1
IFS= read -r -t 3 status <&3 || exit 1
case $status in "HTTP/1."?" 200"*) exit 0 ;; *) exit 1 ;; esac
EOF

# The operations endpoint (/healthz, /readyz, /metrics) must listen beyond the container's loopback.
ENV HTTP_ADDR=0.0.0.0:9464
EXPOSE 9464

# Numeric, so that Kubernetes' runAsNonRoot can verify it: this is the user `recap` created above.
USER 10001:10001

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["/usr/local/bin/recap-healthcheck"]

# SIGTERM (docker stop) makes recap finish in-flight windows within SHUTDOWN_GRACE (default 20s) and exit 0:
# give `docker stop -t` / terminationGracePeriodSeconds a few seconds more than SHUTDOWN_GRACE.
STOPSIGNAL SIGTERM
ENTRYPOINT ["recap"]
CMD ["run"]

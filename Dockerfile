# syntax=docker/dockerfile:1.7
#
# One build of the workspace, two small runtime images:
#   docker build --target moneta       -t moneta .
#   docker build --target internal-api -t moneta-internal-api .
# `moneta` is the last stage, so a plain `docker build .` produces it.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS toolchain
WORKDIR /src
ENV CARGO_INCREMENTAL=0 \
    CARGO_TERM_COLOR=never

# ---------------------------------------------------------------------------
# Dependency skeleton: the manifests and the lock file, with every Rust file
# replaced by an empty `main`. This stage reruns on any change, but its output
# only differs when a manifest, the lock file or the set of source files
# changes, so the expensive dependency layer below stays cached across
# ordinary code edits. (cargo-chef does the same; this needs no extra tool.)
FROM toolchain AS skeleton
COPY . .
RUN find . -path ./target -prune -o -type f -name '*.rs' -print0 \
        | xargs -0 -r sh -c 'for f in "$@"; do echo "fn main() {}" > "$f"; done' sh \
 && find . -type f \
        ! -name '*.rs' ! -name Cargo.toml ! -name Cargo.lock \
        ! -name 'rust-toolchain*' ! -path './.cargo/*' -delete

FROM toolchain AS build
COPY --from=skeleton /src/ /src/
# The same selection scripts/bench and scripts/profile build: features unify
# across it, and symbol names follow them, so link/hot-functions.txt (the
# link order of serving's code, build.rs) names this binary's functions.
ARG SELECTION="-p moneta -p internal-api --bin moneta --bin internal-api --example bench_baseline"
RUN cargo build --release --locked ${SELECTION}

COPY . .
# The skeleton's own crates were compiled after the real sources were last
# modified, so cargo would consider them fresh; forget just those two.
RUN cargo clean --release --package moneta --package internal-api \
 && cargo build --release --locked ${SELECTION} \
 && mkdir -p /out \
 && cp target/release/moneta target/release/internal-api /out/ \
 && /out/moneta --version \
 && /out/internal-api --version

# ---------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: TLS to Redis (rediss://), AWS Secrets Manager, OTLP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 moneta \
 && useradd --system --uid 10001 --gid moneta --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin moneta
COPY deploy/docker/healthcheck /usr/local/bin/healthcheck
WORKDIR /app
# Numeric, so orchestrators can verify "not root" without reading /etc/passwd.
USER 10001:10001

ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="moneta" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.licenses="Apache-2.0"

# ---------------------------------------------------------------------------
FROM runtime AS internal-api
COPY --from=build /out/internal-api /usr/local/bin/internal-api
ENV INTERNAL_API_LISTEN_ADDR=0.0.0.0:4000
EXPOSE 4000
# Follows the listen address if it is overridden. The start period covers
# waiting for PostgreSQL and running the migrations.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD healthcheck "${INTERNAL_API_LISTEN_ADDR##*:}" /health
ENTRYPOINT ["internal-api"]
CMD ["serve"]

# ---------------------------------------------------------------------------
FROM runtime AS moneta
COPY --from=build /out/moneta /usr/local/bin/moneta
ENV MONETA_LISTEN_ADDR=0.0.0.0:3000 \
    MONETA_ADMIN_ADDR=0.0.0.0:9090
# 3000: public API (only nginx talks to it); 9090: /metrics for Prometheus.
EXPOSE 3000 9090
# Liveness only: a dependency outage leaves Moneta serving from fallbacks,
# which is no reason to restart it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD healthcheck "${MONETA_LISTEN_ADDR##*:}" /health/live
# SIGTERM (the default) drains in-flight requests and flushes positions.
ENTRYPOINT ["moneta"]
CMD ["serve"]

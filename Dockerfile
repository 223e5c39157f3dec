# syntax=docker/dockerfile:1
#
# One image for every part of the mesh, with legate at /usr/local/bin/legate:
# `legate init` (run as root by the pod spec, with NET_ADMIN and NET_RAW),
# `legate proxy` and `legate ca serve` (as the default user, 1337).
#
#   docker build -t ghcr.io/legate-mesh/legate:0.1.0 .

# ---- build ------------------------------------------------------------------
# The toolchain is pinned so that an image rebuilt later compiles the same
# code with the same compiler; Cargo.lock pins the dependencies (--locked).
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin legate \
 && install -D -m 0755 target/release/legate /out/legate

# ---- runtime ----------------------------------------------------------------
# Debian slim rather than distroless: `legate init` drives iptables-restore,
# and the iptables package brings both backends (nft and legacy) with the
# libraries they load. The system's CA bundle verifies an https:// trace
# collector when telemetry.otlp_ca_file is unset. No compiler, no cargo, no
# sources in this stage.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables=1.8.9-2 \
      ca-certificates=20230311+deb12u1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/legate /usr/local/bin/legate

# The proxy's uid and gid: its own traffic is exempt from capture by this
# uid, and the pod spec sets the same ids. `legate init` gets root from the
# pod spec (runAsUser: 0), never from the image.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/legate"]
CMD ["--help"]

# No image health check: one image plays three roles (init exits at once,
# the CA has no /ready), so a single check would be wrong for two of them,
# and Kubernetes ignores HEALTHCHECK anyway. Pods use probes on the admin
# server instead (startup/readiness GET /ready, liveness GET /live on :15000,
# as `legate inject` writes them). Under plain Docker, give the proxy
#   docker run --health-cmd 'legate wait-ready --timeout 2s' ... proxy
HEALTHCHECK NONE

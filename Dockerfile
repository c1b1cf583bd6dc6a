# syntax=docker/dockerfile:1.7@sha256:a57df69d0ea827fb7266491f2813635de6f17269be881f696fbfdf2d83dda33e
# apono-connector: built with the Rust toolchain, run as uid 65532 on a slim Debian (BuildKit).
#   docker build -t apono-connector \
#     --build-arg VERSION="$(git describe --tags --always)" --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm -e APONO_URL=... -e APONO_TOKEN=... -e APONO_CONNECTOR_ID=... apono-connector
# README "Docker" shows both modes (remote, and standalone with a volume and the operator API).

# Base images and the syntax frontend above, pinned by digest: the tag says what the digest is
# of; bump both together, e.g.
#   docker buildx imagetools inspect rust:1.95-slim-bookworm   (the "Digest:" line)
# (These were taken from public Dockerfiles that pin the same tags, not looked up in the registry
# itself: confirm them with the command above when you bump.)
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG RUST_DIGEST=sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082
ARG DEBIAN_DIGEST=sha256:7b140f374b289a7c2befc338f42ebe6441b7ea838a042bbd5acbfca6ec875818

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE}@${RUST_DIGEST} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
# Cargo.toml declares the benchmark, so its source must be there even though it is not built.
COPY benches ./benches
# The registry and target/ live in cache mounts, so a rebuild after a change recompiles only what
# changed; the binary is copied out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
    && cp target/release/apono-connector /apono-connector

FROM debian:${DEBIAN_RELEASE}-slim@${DEBIAN_DIGEST} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="apono-connector" \
      org.opencontainers.image.description="Agent that grants and revokes just-in-time access to Rancher, reading its credentials from your own secret stores" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
# CA certificates: the agent verifies the control plane, Rancher and the secret stores against
# the system trust store (plus any CA given per integration). The data dir belongs to the
# runtime user, so the VOLUME made from it (standalone state) is writable and private.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nonroot \
    && install -d -m 0700 -o 65532 -g 65532 /var/lib/apono-connector
COPY --from=build /apono-connector /usr/local/bin/apono-connector
USER 65532:65532
WORKDIR /var/lib/apono-connector
# Standalone mode keeps its state (SQLite, the operator token) in APONO_DATA_DIR: a volume, so it
# outlives the container and access never outlives its grant across a re-created container. In
# remote mode it stays empty; `docker run --rm` or `docker rm -v` removes that anonymous volume.
ENV APONO_HEALTH_ADDR=0.0.0.0:8080 \
    APONO_LOG_FORMAT=json \
    APONO_DATA_DIR=/var/lib/apono-connector
VOLUME ["/var/lib/apono-connector"]
# 8080: /healthz, /readyz, /metrics. 8790: the standalone operator API, served beyond the
# container's loopback only when asked (APONO_LISTEN_ADDR=0.0.0.0:8790; README "Docker").
EXPOSE 8080 8790
# Liveness, not readiness: a control plane that is down makes /readyz 503 on every container at
# once, and ECS, Swarm or autoheal would then replace them all in a loop, cutting revokes mid-way.
# No curl in the image: the binary asks its own /healthz (exit 0 alive, 3 not).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["apono-connector", "healthcheck", "--live"]
ENTRYPOINT ["apono-connector"]
CMD ["run"]

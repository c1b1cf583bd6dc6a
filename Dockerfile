# syntax=docker/dockerfile:1.7
# apono-connector: build with the Rust toolchain, run as a non-root user on a slim Debian.
#   docker build -t apono-connector .
#   docker run --rm -e APONO_URL=... -e APONO_TOKEN=... -e APONO_CONNECTOR_ID=... apono-connector

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Dependencies first, so a change to the sources does not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/rancher.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# Touch so cargo sees the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && cp target/release/apono-connector /apono-connector

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# CA certificates: the agent verifies the control plane, Rancher and the secret stores against
# the system trust store (plus any CA given per integration).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nonroot
COPY --from=build /apono-connector /usr/local/bin/apono-connector
USER 65532:65532
WORKDIR /tmp
ENV APONO_HEALTH_ADDR=0.0.0.0:8080 \
    APONO_LOG_FORMAT=json \
    APONO_DATA_DIR=/tmp/apono-connector
EXPOSE 8080
ENTRYPOINT ["apono-connector"]
CMD ["run"]

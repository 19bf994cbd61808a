# syntax=docker/dockerfile:1
#
# Builds ztnet-coordinator, ztnet-node and ztnet into one slim Debian runtime image.
#
#   docker build -t ztnet .
#   docker run -d --name ztnet-coordinator -p 7443:7443/tcp -p 7443:7443/udp \
#       -v ztnet-coordinator:/var/lib/ztnet-coordinator ztnet \
#       ztnet-coordinator --data-dir /var/lib/ztnet-coordinator --trust-domain corp.example \
#       --listen 0.0.0.0:7443 --advertise coordinator.corp.example:7443
#   docker run -d --name ztnet-node --cap-add NET_ADMIN --device /dev/net/tun \
#       --network host -v ztnet-node:/var/lib/ztnet-node -e ZTNET_TOKEN="$TOKEN" ztnet \
#       ztnet-node --coordinator coordinator.corp.example:7443 \
#       --state-dir /var/lib/ztnet-node --name web1

# ---- build stage: the toolchain pinned in rust-toolchain.toml --------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# The whole tree at once: a manifests-only layer would need stub sources for every target.
# BuildKit cache mounts keep the registry and the target directory between builds instead.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bins \
        -p ztnet-coordinator -p ztnet-node -p ztnet-cli \
    && mkdir -p /out \
    && cp target/release/ztnet-coordinator target/release/ztnet-node target/release/ztnet /out/

# ---- runtime stage ------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# iproute2: ztnet-node configures its TUN interface with `ip`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ztnet-coordinator /out/ztnet-node /out/ztnet /usr/local/bin/
# The coordinator's data directory (CA key, SQLite database, admin.key) and the node's state
# directory (private keys, node certificate, last netmap) must outlive the container.
VOLUME ["/var/lib/ztnet-coordinator", "/var/lib/ztnet-node"]
EXPOSE 7443/tcp 7443/udp 51820/udp
CMD ["ztnet-coordinator", "--help"]

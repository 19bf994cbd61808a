#!/usr/bin/env bash
# Runs every check ztnet has: formatting, clippy with warnings denied, and the whole test suite.
# The integration tests (network namespaces, TUN devices, real processes) need root; without
# root this script says so and runs everything else.
#
#   sudo ./scripts/test.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

# Under sudo, PATH loses the invoking user's ~/.cargo/bin: find their rustup toolchain there.
find_cargo() {
    command -v cargo >/dev/null 2>&1 && return 0
    local home
    if [[ -n ${SUDO_USER:-} ]] && home=$(getent passwd "$SUDO_USER" | cut -d: -f6) &&
        [[ -x $home/.cargo/bin/cargo ]]; then
        export PATH="$home/.cargo/bin:$PATH" CARGO_HOME="$home/.cargo" RUSTUP_HOME="$home/.rustup"
        return 0
    fi
    echo "cargo is not installed: install the Rust toolchain (https://rustup.rs), then rerun." >&2
    return 1
}
find_cargo
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-auto}

# System tools the tests drive: ip, ping, socat, nc, tcpdump, wg, wireguard-go, nft, iperf3,
# inotifywait.
packages=(iproute2 iputils-ping socat netcat-openbsd tcpdump wireguard-tools wireguard-go
    nftables iperf3 sqlite3 openssl jq inotify-tools)
if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    if ((${#missing[@]})); then
        echo "== installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    if [[ ! -e /dev/net/tun ]]; then
        mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun
    fi
fi

echo "== cargo fmt --all -- --check"
cargo fmt --all -- --check

echo "== cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The integration tests start the real binaries from the target directory: build them first.
echo "== cargo build --workspace --bins --locked"
cargo build --workspace --bins --locked

if [[ $EUID -eq 0 ]]; then
    echo "== cargo test --workspace --locked --no-fail-fast"
    cargo test --workspace --locked --no-fail-fast
    # The README's first command must keep working: run the demo on the debug build.
    echo "== scripts/demo.sh"
    "$ROOT/scripts/demo.sh"
else
    echo "== not root: the integration tests (ztnet-integration) need root and are skipped;"
    echo "   run 'sudo ./scripts/test.sh' for the whole suite"
    echo "== cargo test --workspace --exclude ztnet-integration --locked --no-fail-fast"
    cargo test --workspace --exclude ztnet-integration --locked --no-fail-fast
fi

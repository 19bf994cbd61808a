#!/usr/bin/env bash
# User-space instructions per ping round trip of the live daemons, counted by callgrind:
# ztnet-node against boringtun-cli 0.7.1 (default and --threads 1). Side a of each tunnel runs
# under `valgrind --tool=callgrind`, side b natively; after a warm-up the counters are zeroed,
# $PINGS pings go through at $INTERVAL, and the count is dumped. It covers every thread of
# side a's daemon (the timer thread too) and nothing of the kernel. Unlike a time, the count
# does not move with the load on the machine: run it on a busy machine and compare builds.
#
#   sudo bench/ping-instructions.sh
#   PINGS=500 ONLY="ztnet boringtun" sudo -E bench/ping-instructions.sh
#   NODE_BIN=/path/to/ztnet-node sudo -E bench/ping-instructions.sh      # another build (no cargo)
#   OUT_DIR=/tmp/cg sudo -E bench/ping-instructions.sh   # keep the callgrind files
#   FOOTPRINT=1 sudo -E bench/ping-instructions.sh        # cache lines and pages touched
#
# FOOTPRINT=1 runs side a under valgrind's lackey instead, which records every memory access
# and system call, and counts what one ping's two steps touch in user space: the request
# (TUN read to UDP send) and the reply (UDP receive to TUN write), each cut, thread by
# thread, at that thread's blocking wait (bench/footprint.awk). Distinct 64-byte lines and
# 4 KiB pages, code and data (stack included), averaged over the last $PINGS steps of each
# kind (default 40 pings there); `steps` says how many were found. How much of this a ping
# 20 ms after the last one still finds in the caches and the TLB is not measured here.
#
# Needs root. Traffic stays inside the two namespaces it makes (192.0.2.0/24 on a veth pair);
# it removes them and the processes it started when it ends, on failure too.
set -euo pipefail
umask 077   # the callgrind and lackey files, and the keys

FOOTPRINT=${FOOTPRINT:-0}
if [ "$FOOTPRINT" = 1 ]; then PINGS=${PINGS:-40}; else PINGS=${PINGS:-200}; fi
INTERVAL=${INTERVAL:-0.02}
ONLY=${ONLY:-"ztnet boringtun boringtun-1t"}
CACHE=${ZTNET_BENCH_CACHE:-$HOME/.cache/ztnet-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

[ "$(id -u)" = 0 ] || { echo "bench/ping-instructions.sh needs root (namespaces, TUN)" >&2; exit 1; }
[[ $PINGS =~ ^[1-9][0-9]*$ ]] || { echo "PINGS must be a whole number above 0, not '$PINGS'" >&2; exit 1; }
[[ $INTERVAL =~ ^[0-9]*\.?[0-9]+$ ]] ||
    { echo "INTERVAL must be seconds like 0.02, not '$INTERVAL'" >&2; exit 1; }
bench_init zi instr

for tool in wg ping valgrind callgrind_control; do
    command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq \
        wireguard-tools iputils-ping valgrind >/dev/null; break; }
done

if [ -z "${NODE_BIN:-}" ]; then
    echo "== building ztnet-node (release)" >&2
    (cd "$ROOT" && cargo build --release -q -p ztnet-node)
fi
ZTNET=${NODE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ztnet-node}
[ -x "$ZTNET" ] || { echo "no ztnet-node at $ZTNET" >&2; exit 1; }
# A private copy: another checkout sharing the target directory may rebuild it mid-run.
cp "$ZTNET" "$WORK/ztnet-node"
ZTNET="$WORK/ztnet-node"
BTUN="$CACHE/bin/boringtun-cli"
if [ ! -x "$BTUN" ]; then
    echo "== installing boringtun-cli 0.7.1 into $CACHE" >&2
    cargo install -q boringtun-cli --version 0.7.1 --locked --root "$CACHE"
fi

ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add "${TAG}x" netns "$NS_A" type veth peer name "${TAG}y" netns "$NS_B"
ip -n "$NS_A" addr add 192.0.2.1/24 dev "${TAG}x"
ip -n "$NS_B" addr add 192.0.2.2/24 dev "${TAG}y"
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set "${TAG}x" up
ip -n "$NS_B" link set "${TAG}y" up

(umask 077 && wg genkey >"$WORK/a.key" && wg genkey >"$WORK/b.key")
A_PUB=$(wg pubkey <"$WORK/a.key"); B_PUB=$(wg pubkey <"$WORK/b.key")
allow_all_policy >"$WORK/policy.toml"

results=()
n=0
for impl in $ONLY; do
    n=$((n + 1))
    port=$((51820 + n)) net=10.96.$n
    out="$WORK/$impl.callgrind"
    vg=(valgrind --tool=callgrind --callgrind-out-file="$out")
    [ "$FOOTPRINT" = 1 ] &&
        vg=(valgrind --tool=lackey --trace-mem=yes --trace-syscalls=yes --log-file="$out.trace")
    for side in a b; do
        ns=$NS_A pre=("${vg[@]}")
        [ $side = b ] && { ns=$NS_B; pre=(); }
        case $impl in
        ztnet)
            ztnet_config "$side" "${TAG}z$n$side" "$net" "$port" >"$WORK/$impl.$side.toml"
            RUST_LOG=warn ip netns exec "$ns" "${pre[@]}" "$ZTNET" \
                --config "$WORK/$impl.$side.toml" >>"$WORK/$impl.log" 2>&1 &
            PIDS+=($!)
            wait_until "[ -S /var/run/ztnet/${TAG}z$n$side.sock ]"
            ;;
        boringtun | boringtun-1t)
            extra=()
            [ "$impl" = boringtun-1t ] && extra=(--threads 1)
            ifc=${TAG}b$n$side
            ip netns exec "$ns" "${pre[@]}" "$BTUN" --foreground --disable-drop-privileges \
                "${extra[@]}" "$ifc" >>"$WORK/$impl.log" 2>&1 &
            PIDS+=($!)
            wait_until "[ -S /var/run/wireguard/$ifc.sock ]"
            wg_configure "$side" "$ifc" "$net" "$port"
            ;;
        *) echo "unknown implementation $impl (ztnet, boringtun, boringtun-1t)" >&2; exit 1 ;;
        esac
    done
    wait_until "ip netns exec $NS_A ping -c1 -W1 $net.2"
    ip netns exec "$NS_A" ping -q -c 20 -i "$INTERVAL" "$net.2" >/dev/null
    if [ "$FOOTPRINT" = 1 ]; then
        ip netns exec "$NS_A" ping -q -c "$PINGS" -i "$INTERVAL" "$net.2" >/dev/null
        # Stop side a, so that its trace ends here (lackey writes as it goes).
        kill "${PIDS[0]}" 2>/dev/null || true
        wait "${PIDS[0]}" 2>/dev/null || true
        results+=("$impl $(awk -v N="$PINGS" -f "$ROOT/bench/footprint.awk" "$out.trace" | tr '\n' ' ')")
        [ -n "${OUT_DIR:-}" ] && mkdir -p "$OUT_DIR" && cp "$out.trace" "$OUT_DIR/$impl.lackey"
    else
        vpid=$(pgrep -f -- "--callgrind-out-file=$out" | head -1)
        callgrind_control -z "$vpid" >/dev/null 2>&1
        ip netns exec "$NS_A" ping -q -c "$PINGS" -i "$INTERVAL" "$net.2" >/dev/null
        callgrind_control -d "$vpid" >/dev/null 2>&1
        wait_until "ls $out.* "
        sleep 0.2
        f=$(ls -t "$out".* | head -1)
        total=$(sed -n 's/^summary: *//p; s/^totals: *//p' "$f" | head -1)
        results+=("$impl $total")
        [ -n "${OUT_DIR:-}" ] && mkdir -p "$OUT_DIR" && cp "$f" "$OUT_DIR/$impl.callgrind"
    fi
    # Leave the next implementation a quiet machine.
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
done

echo
if [ "$FOOTPRINT" = 1 ]; then
    echo "user-space footprint of one ping's steps on side a, mean of the last $PINGS of each:"
    printf '  %-14s %-8s %11s %11s %11s %11s %6s\n' implementation step "code lines" \
        "data lines" "code pages" "data pages" steps
    for r in "${results[@]}"; do
        read -r impl rest <<<"$r"
        set -- $rest
        while [ $# -ge 6 ]; do
            printf '  %-14s %-8s %11s %11s %11s %11s %6s\n' "$impl" "$1" "$2" "$3" "$4" "$5" "$6"
            shift 6
        done
    done
    exit 0
fi
echo "user-space instructions per round trip, side a's daemon, $PINGS pings at ${INTERVAL}s:"
base=""
for r in "${results[@]}"; do
    read -r impl total <<<"$r"
    per=$((total / PINGS))
    [ "$impl" = boringtun ] && base=$per
done
for r in "${results[@]}"; do
    read -r impl total <<<"$r"
    per=$((total / PINGS))
    ratio=""
    [ -n "$base" ] && ratio=$(awk -v a="$per" -v b="$base" 'BEGIN { printf "(x%.2f)", a / b }')
    printf '  %-14s %8d %s\n' "$impl" "$per" "$ratio"
done

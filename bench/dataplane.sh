#!/usr/bin/env bash
# Data-plane benchmark: plain veth, ztnet-node (filter on; and ztnet-wg, its plain WireGuard
# mode configured with `wg`), boringtun-cli 0.7.1 (defaults and
# --threads 1) and wireguard-go, each between two network namespaces joined by a veth pair with
# offloads off, every WireGuard pair configured alike (MTU 1420).
#
# Measures in one run: iperf3 TCP throughput (1 and 4 streams, $SECS s), 64-byte UDP packets
# received per second, ping latency, the daemons' CPU seconds per GB moved (single-stream
# test), and receive-buffer drops of the WireGuard sockets (UdpRcvbufErrors of port 51820).
# Prints each figure with its ratio to boringtun-cli's defaults.
#
# Needs root. Traffic stays inside the two namespaces it makes; it removes them and the
# processes it started when it ends, on failure too.
#
#   sudo bench/dataplane.sh            # everything
#   SECS=5 ONLY="ztnet boringtun" bench/dataplane.sh
#   ONLY="ztnet ztnet-1q ztnet-nooff boringtun" bench/dataplane.sh  # one TUN queue; no offloads
set -euo pipefail

SECS=${SECS:-10}
PINGS=${PINGS:-41}
# LAT_ONLY=1: ping latency only (no iperf3), e.g. PINGS=201 LAT_ONLY=1 for a finer median.
LAT_ONLY=${LAT_ONLY:-0}
UDP_SECS=${UDP_SECS:-5}
ONLY=${ONLY:-"veth ztnet ztnet-wg boringtun boringtun-1t wireguard-go"}
CACHE=${ZTNET_BENCH_CACHE:-$HOME/.cache/ztnet-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

[ "$(id -u)" = 0 ] || { echo "bench/dataplane.sh needs root (namespaces, TUN)" >&2; exit 1; }
bench_init zb bench

need() { # tool:package ...
    local missing=() t
    for t in "$@"; do command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}"); done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}
need iperf3:iperf3 jq:jq ethtool:ethtool wireguard-go:wireguard-go wg:wireguard-tools bc:bc \
    ping:iputils-ping
command -v ethtool >/dev/null || echo "warning: no ethtool; veth offloads stay on" >&2

echo "== building ztnet-node (release)" >&2
(cd "$ROOT" && cargo build --release -q -p ztnet-node)
# A private copy: another checkout sharing the target directory may rebuild it mid-run.
cp "${CARGO_TARGET_DIR:-$ROOT/target}/release/ztnet-node" "$WORK/ztnet-node"
ZTNET="$WORK/ztnet-node"
BTUN="$CACHE/bin/boringtun-cli"
if [ ! -x "$BTUN" ]; then
    echo "== installing boringtun-cli 0.7.1 into $CACHE" >&2
    cargo install -q boringtun-cli --version 0.7.1 --locked --root "$CACHE"
fi

in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }

setup_link() {
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    in_a ip link set lo up
    in_b ip link set lo up
    ip -n "$NS_A" link add va type veth peer name vb netns "$NS_B"
    for side in a b; do
        local ns=$NS_A dev=va addr=192.0.2.1
        [ $side = b ] && ns=$NS_B dev=vb addr=192.0.2.2
        ip -n "$ns" addr add $addr/24 dev $dev
        ip -n "$ns" link set $dev up
        if command -v ethtool >/dev/null; then
            ip netns exec "$ns" ethtool -K $dev tso off gso off gro off tx off rx off \
                >/dev/null 2>&1 || true
        fi
    done
}

teardown_link() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    PIDS=()
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
}

# Waits until a file exists or a command succeeds (deadline 15 s).

# Configures the overlay address of a `wg`-configured interface in one namespace.
wg_side() { # ns iface key peer_pub my_addr peer_underlay peer_overlay
    local ns=$1 ifc=$2 key=$3 peer=$4 me=$5 under=$6 over=$7
    ip netns exec "$ns" wg set "$ifc" private-key "$key" listen-port 51820 \
        peer "$peer" endpoint "$under:51820" allowed-ips "$over/32"
    ip -n "$ns" addr add "$me/24" dev "$ifc"
    ip -n "$ns" link set "$ifc" mtu 1420 up
}

keys() {
    umask 077
    wg genkey >"$WORK/a.key"; wg genkey >"$WORK/b.key"
    chmod 600 "$WORK"/*.key
    A_PUB=$(wg pubkey <"$WORK/a.key"); B_PUB=$(wg pubkey <"$WORK/b.key")
}

start_wg_impl() { # name: boringtun | boringtun-1t | wireguard-go
    keys
    local side ns ifc
    for side in a b; do
        # Both namespaces share /var/run/wireguard, so each side has its own name.
        ns=$NS_A; ifc=${TAG}w$side
        [ $side = b ] && ns=$NS_B
        case $1 in
        boringtun) ip netns exec "$ns" "$BTUN" --foreground --disable-drop-privileges "$ifc" \
            >>"$WORK/$1.log" 2>&1 & ;;
        boringtun-1t) ip netns exec "$ns" "$BTUN" --foreground --disable-drop-privileges \
            --threads 1 "$ifc" >>"$WORK/$1.log" 2>&1 & ;;
        wireguard-go) WG_PROCESS_FOREGROUND=1 ip netns exec "$ns" wireguard-go "$ifc" \
            >>"$WORK/$1.log" 2>&1 & ;;
        esac
        PIDS+=($!)
        wait_until "[ -S /var/run/wireguard/$ifc.sock ]"
        if [ $side = a ]; then
            wg_side "$NS_A" "$ifc" "$WORK/a.key" "$B_PUB" 10.99.0.1 192.0.2.2 10.99.0.2
        else
            wg_side "$NS_B" "$ifc" "$WORK/b.key" "$A_PUB" 10.99.0.2 192.0.2.1 10.99.0.1
        fi
    done
}

start_ztnet() { # [VAR=value ...]: environment for the daemons
    local ifc=${TAG}z
    keys
    allow_all_policy >"$WORK/policy.toml"
    for side in a b; do
        local ns=$NS_A
        [ $side = b ] && ns=$NS_B
        ztnet_config "$side" "$ifc$side" 10.99.0 51820 >"$WORK/$side.toml"
        env "$@" RUST_LOG=warn ip netns exec "$ns" "$ZTNET" --config "$WORK/$side.toml" \
            >>"$WORK/ztnet.log" 2>&1 &
        PIDS+=($!)
        wait_until "[ -S /var/run/ztnet/$ifc$side.sock ]"
    done
}

# ---- ztnet-wg: ztnet-node in plain WireGuard mode, configured with `wg` like the others ----
# (kept as its own block; `ztnet-wg` in ONLY and one line of the loop's case refer to it)
start_ztnet_wg() {
    keys
    local side ns ifc
    for side in a b; do
        ns=$NS_A; ifc=${TAG}g$side
        [ $side = b ] && ns=$NS_B
        RUST_LOG=warn ip netns exec "$ns" "$ZTNET" wg --foreground "$ifc" \
            >>"$WORK/ztnet-wg.log" 2>&1 &
        PIDS+=($!)
        wait_until "[ -S /var/run/wireguard/$ifc.sock ]"
        if [ $side = a ]; then
            wg_side "$NS_A" "$ifc" "$WORK/a.key" "$B_PUB" 10.99.0.1 192.0.2.2 10.99.0.2
        else
            wg_side "$NS_B" "$ifc" "$WORK/b.key" "$A_PUB" 10.99.0.2 192.0.2.1 10.99.0.1
        fi
    done
}
# ---- end of the ztnet-wg block ----

cpu_ticks() { # sum of utime+stime of the started daemons
    local t=0 p
    for p in "${PIDS[@]}"; do
        [ -r /proc/$p/stat ] || continue
        t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat)))
    done
    echo $t
}

# Receive-buffer drops of the WireGuard sockets (local port 51820) in both namespaces, from the
# per-socket "drops" column of /proc/net/udp{,6}; other UDP sockets (iperf3's) are not counted.
rcvbuf_errors() {
    local n=0 ns v
    for ns in "$NS_A" "$NS_B"; do
        v=$(ip netns exec "$ns" awk 'FNR > 1 && $2 ~ /:C96C$/ { d += $NF } END { print d + 0 }' \
            /proc/net/udp /proc/net/udp6)
        n=$((n + ${v:-0}))
    done
    echo $n
}

# UdpRcvbufErrors of both namespaces (every UDP socket, iperf3's own included).
snmp_rcvbuf() {
    local n=0 ns v
    for ns in "$NS_A" "$NS_B"; do
        v=$(ip netns exec "$ns" awk '/^Udp:/ { if (h) print $i; else { for (i = 1; i <= NF; i++)
            if ($i == "RcvbufErrors") break; h = 1 } }' /proc/net/snmp)
        n=$((n + ${v:-0}))
    done
    echo $n
}

declare -A R
measure() { # name target
    local name=$1 dst=$2 hz ticks0 ticks1 bytes j
    hz=$(getconf CLK_TCK)
    in_b iperf3 -s -D -I "$WORK/iperf.pid" >/dev/null
    wait_until "[ -s $WORK/iperf.pid ]"
    wait_until "in_a ping -c1 -W1 $dst"
    # Latency first, on an idle tunnel.
    # Median of $PINGS round trips: the machine's other load makes the mean jumpy.
    R[$name,ping]=$(in_a ping -n -c "$PINGS" -i 0.05 "$dst" | sed -n 's/.*time=\([0-9.]*\).*/\1/p' |
        sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
    if [ "$LAT_ONLY" = 1 ]; then
        kill "$(cat "$WORK/iperf.pid")" 2>/dev/null || true
        rm -f "$WORK/iperf.pid"
        return
    fi
    local drops0 snmp0; drops0=$(rcvbuf_errors); snmp0=$(snmp_rcvbuf)

    ticks0=$(cpu_ticks)
    j=$(in_a iperf3 -c "$dst" -t "$SECS" -J)
    ticks1=$(cpu_ticks)
    R[$name,tcp1]=$(jq '.end.sum_received.bits_per_second / 1e9' <<<"$j")
    bytes=$(jq '.end.sum_received.bytes' <<<"$j")
    if [ "$name" = veth ]; then
        R[$name,cpu]="-"
    else
        R[$name,cpu]=$(echo "scale=2; ($ticks1 - $ticks0) / $hz / ($bytes / 1000000000)" | bc)
    fi
    j=$(in_a iperf3 -c "$dst" -t "$SECS" -P 4 -J)
    R[$name,tcp4]=$(jq '.end.sum_received.bits_per_second / 1e9' <<<"$j")
    j=$(in_a iperf3 -c "$dst" -u -b 0 -l 64 -t "$UDP_SECS" -J)
    R[$name,udp]=$(jq '(.end.sum.packets - .end.sum.lost_packets) / .end.sum.seconds / 1000' <<<"$j")
    R[$name,drops]=$(( $(rcvbuf_errors) - drops0 ))
    R[$name,snmp]=$(( $(snmp_rcvbuf) - snmp0 ))
    kill "$(cat "$WORK/iperf.pid")" 2>/dev/null || true
    rm -f "$WORK/iperf.pid"
}

for impl in $ONLY; do
    echo "== $impl" >&2
    setup_link
    case $impl in
    veth) measure veth 192.0.2.2 ;;
    ztnet) start_ztnet; measure ztnet 10.99.0.2 ;;
    # The same daemon with one TUN queue, and without TUN offloads: what each one is worth.
    ztnet-1q) start_ztnet ZTNET_TUN_QUEUES=1; measure ztnet-1q 10.99.0.2 ;;
    ztnet-nooff) start_ztnet ZTNET_TUN_OFFLOAD=off; measure ztnet-nooff 10.99.0.2 ;;
    ztnet-wg) start_ztnet_wg; measure ztnet-wg 10.99.0.2 ;;
    boringtun | boringtun-1t | wireguard-go) start_wg_impl "$impl"; measure "$impl" 10.99.0.2 ;;
    *) echo "unknown implementation $impl" >&2; exit 1 ;;
    esac
    teardown_link
done

ratio() { # value base
    if [ -z "${2:-}" ] || [ "$2" = "-" ] || [ "$1" = "-" ]; then echo "-"; return; fi
    echo "scale=2; $1 / $2" | bc 2>/dev/null || echo "-"
}

base=boringtun
printf '\n%-13s %16s %16s %18s %14s %14s %10s %10s\n' implementation "tcp 1 (Gbit/s)" \
    "tcp 4 (Gbit/s)" "udp 64B (kpkt/s)" "ping med (ms)" "cpu s/GB" "wg drops" "all drops"
for impl in $ONLY; do
    cell() { # metric
        local v=${R[$impl,$1]:-"-"} r
        if [ "$v" = "-" ]; then printf '%s' "-"; return; fi
        r=$(ratio "$v" "${R[$base,$1]:-}")
        printf '%.3f (x%s)' "$v" "$r"
    }
    printf '%-13s %16s %16s %18s %14s %14s %10s %10s\n' "$impl" "$(cell tcp1)" "$(cell tcp4)" \
        "$(cell udp)" "$(cell ping)" "$(cell cpu)" "${R[$impl,drops]:-"-"}" \
        "${R[$impl,snmp]:-"-"}"
done
echo "(ratios against boringtun-cli 0.7.1 with its defaults; SECS=$SECS; wg drops: receive-buffer"
echo " drops of the WireGuard sockets, port 51820; all drops: UdpRcvbufErrors of both namespaces)"

#!/usr/bin/env bash
# FC-26 scale check: one ztnet-node (static mode) with $PEERS idle peers, every one with
# persistent keepalive 25 s on both ends, no traffic. The peers are one process
# (wg-idle-peers, from integration/src/bin) holding one boringtun Tunn and one UDP socket per
# peer: it stands in for $PEERS remote machines.
#
# Prints, per minute: handshake initiations the node sent and received (its status JSON),
# initiations the stand-in saw, sessions up on both sides, and the node's CPU seconds in that
# minute. Default 7 minutes (the first minute holds the 200 first handshakes).
#
# Needs root. Traffic stays inside the two namespaces it makes; it removes them and the
# processes it started when it ends, on failure too.
#
#   sudo bench/idle-peers.sh
#   PEERS=200 MINUTES=7 NODE_BIN=/path/to/other/ztnet-node sudo -E bench/idle-peers.sh
set -euo pipefail

PEERS=${PEERS:-200}
MINUTES=${MINUTES:-7}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=zi$$
NS_N=${TAG}n
NS_P=${TAG}p
IFACE=${TAG}wg
WORK=$(mktemp -d /tmp/ztnet-idle.XXXXXX)
PIDS=()

[ "$(id -u)" = 0 ] || { echo "bench/idle-peers.sh needs root (namespaces, TUN)" >&2; exit 1; }
command -v jq >/dev/null || { apt-get update -qq && apt-get install -y -qq jq >/dev/null; }

cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    ip netns del "$NS_N" 2>/dev/null || true
    ip netns del "$NS_P" 2>/dev/null || true
    rm -f "/var/run/ztnet/$IFACE.sock" "/var/run/wireguard/$IFACE.sock"
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== building ztnet-node and wg-idle-peers (release)" >&2
(cd "$ROOT" && cargo build --release -q -p ztnet-node -p ztnet-integration --bin ztnet-node \
    --bin wg-idle-peers)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
# Private copies: another checkout sharing the target directory may rebuild them mid-run.
cp "${NODE_BIN:-$TARGET/ztnet-node}" "$WORK/ztnet-node"
cp "$TARGET/wg-idle-peers" "$WORK/wg-idle-peers"

ip netns add "$NS_N"
ip netns add "$NS_P"
ip -n "$NS_N" link set lo up
ip -n "$NS_P" link set lo up
ip -n "$NS_N" link add vn type veth peer name vp netns "$NS_P"
ip -n "$NS_N" addr add 192.0.2.1/24 dev vn
ip -n "$NS_P" addr add 192.0.2.2/24 dev vp
ip -n "$NS_N" link set vn up
ip -n "$NS_P" link set vp up

"$WORK/ztnet-node" genkey --output "$WORK/node.key" 2>/dev/null
NODE_PUB=$("$WORK/ztnet-node" pubkey < "$WORK/node.key")

ip netns exec "$NS_P" "$WORK/wg-idle-peers" --count "$PEERS" --bind 192.0.2.2 \
    --first-port 52000 --node-key "$NODE_PUB" --node 192.0.2.1:51820 \
    --peers-toml "$WORK/peers.toml" --stats "$WORK/stats.txt" >"$WORK/peers.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 150); do [ -s "$WORK/stats.txt" ] && break; sleep 0.1; done
[ -s "$WORK/stats.txt" ] || { echo "stand-in did not start:"; cat "$WORK/peers.log"; exit 1; }

cat > "$WORK/node.toml" <<EOF
[interface]
name = "$IFACE"
private_key_file = "node.key"
listen_port = 51820
addresses = ["10.91.255.254/16"]

[identity]
name = "hub"
EOF
cat "$WORK/peers.toml" >> "$WORK/node.toml"

RUST_LOG=${RUST_LOG:-warn} ip netns exec "$NS_N" "$WORK/ztnet-node" --config "$WORK/node.toml" \
    >"$WORK/node.log" 2>&1 &
# `ip netns exec` execs the node, so this is the node's own pid.
NODE_PID=$!
PIDS+=("$NODE_PID")
for _ in $(seq 1 150); do [ -S "/var/run/ztnet/$IFACE.sock" ] && break; sleep 0.1; done
[ -S "/var/run/ztnet/$IFACE.sock" ] || { echo "node did not start:"; cat "$WORK/node.log"; exit 1; }

status() { printf 'status\n' | socat - "UNIX-CONNECT:/var/run/ztnet/$IFACE.sock"; }
# Sum of a per-peer field over all peers (0 for a node without it).
node_sum() { status | jq "[.peers[].$1 // 0] | add"; }
node_up() { status | jq '[.peers[] | select(.last_handshake != null)] | length'; }
stat_of() { awk -v k="$1" '$1 == k { print $2 }' "$WORK/stats.txt"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$NODE_PID/stat"; }
HZ=$(getconf CLK_TCK)

# node_*: the node's own counters (status JSON; 0 from a node without them); peer_*: what
# the stand-in saw (initiations it got from the node and sent to it); gap_s: peer-seconds
# without a session in that minute; up: sessions up at the minute mark, node / stand-in.
printf '%-6s %-9s %-9s %-9s %-9s %-9s %-7s %-16s %-6s\n' minute node_sent node_recv node_held \
    peer_recv peer_sent gap_s "up node/peers" cpu_s
prev_sent=0 prev_recv=0 prev_held=0 prev_peer=0 prev_precv=0 prev_gap=0 prev_cpu=$(cpu_ticks)
tot_precv=0 tot_peer=0 tot_gap=0
start=$(date +%s)
tot_sent=0 tot_recv=0 tot_cpu=0
for m in $(seq 1 "$MINUTES"); do
    # Sleep to the minute mark of the run (not a wait on a condition: a sampling period).
    now=$(date +%s)
    sleep $((start + 60 * m - now))
    sent=$(node_sum initiations_sent)
    recv=$(node_sum initiations_received)
    held=$(node_sum initiations_held)
    peer=$(stat_of inits_to_node)
    precv=$(stat_of inits_from_node)
    gap=$(stat_of no_session_peer_seconds)
    cpu=$(cpu_ticks)
    up=$(node_up)
    pup=$(stat_of sessions_up)
    d_cpu=$(echo "scale=2; ($cpu - $prev_cpu) / $HZ" | bc)
    printf '%-6s %-9s %-9s %-9s %-9s %-9s %-7s %-16s %-6s\n' "$m" $((sent - prev_sent)) \
        $((recv - prev_recv)) $((held - prev_held)) $((precv - prev_precv)) \
        $((peer - prev_peer)) $((gap - prev_gap)) "$up/$pup" "$d_cpu"
    if [ "$m" -gt 1 ]; then
        tot_sent=$((tot_sent + sent - prev_sent))
        tot_recv=$((tot_recv + recv - prev_recv))
        tot_precv=$((tot_precv + precv - prev_precv))
        tot_peer=$((tot_peer + peer - prev_peer))
        tot_gap=$((tot_gap + gap - prev_gap))
        tot_cpu=$((tot_cpu + cpu - prev_cpu))
    fi
    prev_sent=$sent prev_recv=$recv prev_held=$held prev_peer=$peer prev_precv=$precv
    prev_gap=$gap prev_cpu=$cpu
done
if [ "$MINUTES" -gt 1 ]; then
    n=$((MINUTES - 1))
    per() { echo "scale=1; $1 / $n" | bc; }
    echo "minutes 2-$MINUTES, a minute: $(per $((tot_precv + tot_peer))) handshake initiations on" \
        "the wire (node to peers $(per $tot_precv), peers to node $(per $tot_peer);" \
        "the node counted $(per $tot_sent) sent, $(per $tot_recv) received)," \
        "$(per $tot_gap) peer-seconds without a session, node CPU" \
        "$(echo "scale=2; $tot_cpu / $HZ / $n" | bc) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
fi
grep -E "WARN|ERROR" "$WORK/node.log" | head -5 || true

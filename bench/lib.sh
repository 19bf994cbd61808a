# Shared by the scripts in bench/ (sourced, not run): the two namespaces a script makes, the
# cleanup that removes them with every process it started (also on failure or Ctrl-C), a wait
# with a deadline, and the static-mode configuration of one side of a ztnet-node tunnel.

# bench_init PREFIX NAME: sets TAG (PREFIX and the script's pid: unique on the machine), NS_A
# and NS_B (the two namespaces, not made yet), WORK (a new directory /tmp/ztnet-NAME.XXXXXX)
# and PIDS (the processes to end), and removes all of them when the script exits.
bench_init() {
    TAG=$1$$
    NS_A=${TAG}a
    NS_B=${TAG}b
    WORK=""
    PIDS=()
    trap bench_cleanup EXIT
    # Ctrl-C or kill: stop, and let the EXIT trap clean up. (Without this, a ping that catches
    # SIGINT and exits normally would let the script carry on.)
    trap 'exit 130' INT
    trap 'exit 143' TERM
    WORK=$(mktemp -d "/tmp/ztnet-$2.XXXXXX")
}

bench_cleanup() {
    local p
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    rm -f /var/run/wireguard/"$TAG"*.sock /var/run/ztnet/"$TAG"*.sock
    [ -n "$WORK" ] && rm -rf "$WORK"
    return 0
}

# wait_until COMMAND: runs COMMAND (a string, evaluated) every 0.1 s until it succeeds, for
# at most $WAIT_TRIES tries (150: 15 s); says what it waited for when it gives up.
wait_until() {
    local i
    for i in $(seq 1 "${WAIT_TRIES:-150}"); do
        if eval "$1" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for: $1" >&2
    return 1
}

# allow_all_policy: a policy that grants everything, so that the filter is on but drops nothing.
allow_all_policy() {
    printf '[[grant]]\nfrom = ["*"]\nto = ["*"]\nports = ["any"]\n'
}

# ztnet_config SIDE IFACE NET PORT: prints the node.toml of side a (overlay NET.1, underlay
# 192.0.2.1) or side b (NET.2, 192.0.2.2) of a tunnel on UDP port PORT, each with the other as
# its one peer. Reads A_PUB and B_PUB; the key files are a.key and b.key and the policy file
# policy.toml, beside the configuration.
ztnet_config() {
    local side=$1 ifc=$2 net=$3 port=$4 me=1 peer=2 peer_pub=$B_PUB
    [ "$side" = b ] && { me=2; peer=1; peer_pub=$A_PUB; }
    cat <<EOF
[interface]
name = "$ifc"
private_key_file = "$side.key"
listen_port = $port
addresses = ["$net.$me/24"]
policy_file = "policy.toml"
[identity]
name = "n$me"
[[peer]]
name = "n$peer"
public_key = "$peer_pub"
endpoint = "192.0.2.$peer:$port"
allowed_ips = ["$net.$peer/32"]
EOF
}

# wg_configure SIDE IFACE NET PORT: configures the WireGuard interface IFACE of side a or b,
# made by a daemon driven with `wg` (boringtun-cli, wireguard-go, ztnet-node wg), as
# ztnet_config does for ztnet-node: key $WORK/SIDE.key, the other side as its one peer, the
# overlay address, MTU 1420, up.
wg_configure() {
    local side=$1 ifc=$2 net=$3 port=$4 ns=$NS_A me=1 peer=2 peer_pub=$B_PUB
    [ "$side" = b ] && { ns=$NS_B; me=2; peer=1; peer_pub=$A_PUB; }
    ip netns exec "$ns" wg set "$ifc" private-key "$WORK/$side.key" listen-port "$port" \
        peer "$peer_pub" endpoint "192.0.2.$peer:$port" allowed-ips "$net.$peer/32"
    ip -n "$ns" addr add "$net.$me/24" dev "$ifc"
    ip -n "$ns" link set "$ifc" mtu 1420 up
}

#!/usr/bin/env bash
# A guided tour of ztnet on one machine: a coordinator, a router and two "clouds" with five
# nodes, each in its own network namespace. It builds the binaries, creates a zero-trust network,
# enrolls the nodes with join tokens, applies a default-deny policy and shows which traffic
# passes and which is dropped. Everything it creates carries a random id and is removed on exit.
#
#   sudo ./scripts/demo.sh            # debug build (faster to compile)
#   sudo ./scripts/demo.sh --release  # release build
#
# Underlay addresses come from the documentation ranges and exist only inside the namespaces.
set -euo pipefail

PROFILE=debug
for arg in "$@"; do
    case "$arg" in
        --release) PROFILE=release ;;
        --debug) PROFILE=debug ;;
        -h | --help)
            sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "demo.sh: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

if [[ $EUID -ne 0 ]]; then
    echo "demo.sh needs root: it creates network namespaces, veth links and TUN devices." >&2
    echo "Run it as: sudo $0 $*" >&2
    exit 1
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BOLD=$'\e[1m' DIM=$'\e[2m' GREEN=$'\e[32m' RED=$'\e[31m' RESET=$'\e[0m'
if [[ ! -t 1 ]]; then BOLD='' DIM='' GREEN='' RED='' RESET=''; fi

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

step() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$RESET"; }
say() { printf '%s\n' "$*"; }
show() { printf '%s$ %s%s\n' "$DIM" "$*" "$RESET"; }

# ---------------------------------------------------------------------------------------------
step "1. System packages"
need=()
for pair in ip:iproute2 ping:iputils-ping socat:socat jq:jq tcpdump:tcpdump; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    say "installing: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        >/dev/null
else
    say "iproute2, iputils-ping, socat, jq and tcpdump are present"
fi
find_cargo
if [[ ! -e /dev/net/tun ]]; then
    mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun
fi

# ---------------------------------------------------------------------------------------------
step "2. Build ztnet-coordinator, ztnet-node and ztnet ($PROFILE profile)"
cargo_flags=(--locked --bins -p ztnet-coordinator -p ztnet-node -p ztnet-cli)
[[ $PROFILE == release ]] && cargo_flags+=(--release)
show "cargo build ${cargo_flags[*]}"
(cd "$ROOT" && cargo build -q "${cargo_flags[@]}")
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
BIN="$TARGET_DIR/$PROFILE"
for b in ztnet-coordinator ztnet-node ztnet; do
    [[ -x $BIN/$b ]] || { echo "build did not produce $BIN/$b" >&2; exit 1; }
done
say "binaries in $BIN"

# ---------------------------------------------------------------------------------------------
# ZTNET_DEMO_ID picks the name suffix (letters and digits), for people who share a machine
# and keep to their own names; by default it is random.
ID=${ZTNET_DEMO_ID:-$(od -An -N2 -tx2 /dev/urandom | tr -d ' \n')}
[[ $ID =~ ^[a-z0-9]{1,8}$ ]] || { echo "ZTNET_DEMO_ID must be 1-8 lowercase letters or digits" >&2; exit 2; }
P="ztdemo-$ID"
WORK=$(mktemp -d "/tmp/ztnet-demo-$ID.XXXX")
NS_COORD="$P-coord" NS_RTR="$P-rtr" NS_A="$P-cloud-a" NS_B="$P-cloud-b"
NODES=(web1 web2 db1 ops1 stray1)
declare -A NODE_CLOUD=([web1]=a [web2]=a [db1]=b [ops1]=b [stray1]=b)
declare -A NODE_UNDERLAY=([web1]=198.51.100.11 [web2]=198.51.100.12 [db1]=203.0.113.21
    [ops1]=203.0.113.22 [stray1]=203.0.113.23)
declare -A NODE_IFACE NODE_OVERLAY
n=0
for node in "${NODES[@]}"; do
    n=$((n + 1))
    NODE_IFACE[$node]="zt${ID}n$n"
done
COORD_ADDR=192.0.2.10:7443
PIDS=()
NAMESPACES=()

# The terminal, kept so that cleanup can report even when a signal arrives inside a command
# whose output goes to /dev/null (a trap runs with the interrupted command's redirections).
exec 3>&1 4>&2
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    exec 1>&3 2>&4
    printf '\n%s== cleaning up (namespaces %s-*, %s)%s\n' "$BOLD" "$P" "$WORK" "$RESET"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    if ((rc == 130)); then
        say "interrupted"
    elif ((rc != 0)) && [[ -d $WORK ]]; then
        say "the demo failed (exit $rc); last lines of each log:"
        for log in "$WORK"/*.log; do
            [[ -f $log ]] || continue
            printf '%s--- %s%s\n' "$DIM" "$(basename "$log")" "$RESET"
            tail -n 5 "$log"
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ns_add() {
    ip netns add "$1"
    NAMESPACES+=("$1")
    ip -n "$1" link set lo up
}

# Runs a command inside a namespace in the background, logging to $WORK/NAME.log.
spawn() {
    local ns=$1 name=$2
    shift 2
    ip netns exec "$ns" "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
}

# Waits up to $1 seconds for the command that follows to succeed.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

zt() {
    ip netns exec "$NS_COORD" env ZTNET_COORDINATOR="$COORD_ADDR" \
        ZTNET_API_KEY_FILE="$WORK/coord/admin.key" ZTNET_CA_CERT="$WORK/coord/ca.pem" \
        "$BIN/ztnet" "$@"
}
zt_show() {
    show "ztnet $*"
    zt "$@"
}

# ---------------------------------------------------------------------------------------------
step "3. The topology: network namespaces named $P-*"
cat <<EOF
    coordinator 192.0.2.10 --- router --- cloud A 198.51.100.0/24: web1 .11, web2 .12
                                     \\--- cloud B 203.0.113.0/24:  db1 .21, ops1 .22, stray1 .23
EOF
for ns in "$NS_COORD" "$NS_RTR" "$NS_A" "$NS_B"; do ns_add "$ns"; done
ip netns exec "$NS_RTR" sysctl -qw net.ipv4.ip_forward=1
ip link add name eth0 netns "$NS_COORD" type veth peer name to-coord netns "$NS_RTR"
ip -n "$NS_COORD" addr add 192.0.2.10/24 dev eth0
ip -n "$NS_COORD" link set eth0 up
ip -n "$NS_COORD" route add default via 192.0.2.1
ip -n "$NS_RTR" addr add 192.0.2.1/24 dev to-coord
ip -n "$NS_RTR" link set to-coord up
for cloud in a b; do
    cns="$P-cloud-$cloud"
    gw=$([[ $cloud == a ]] && echo 198.51.100.1/24 || echo 203.0.113.1/24)
    ip -n "$cns" link add br0 type bridge
    ip -n "$cns" link set br0 up
    ip link add name uplink netns "$cns" type veth peer name "to-$cloud" netns "$NS_RTR"
    ip -n "$cns" link set uplink master br0 up
    ip -n "$NS_RTR" addr add "$gw" dev "to-$cloud"
    ip -n "$NS_RTR" link set "to-$cloud" up
done
for node in "${NODES[@]}"; do
    ns="$P-$node" cns="$P-cloud-${NODE_CLOUD[$node]}"
    gw=$([[ ${NODE_CLOUD[$node]} == a ]] && echo 198.51.100.1 || echo 203.0.113.1)
    ns_add "$ns"
    ip link add name eth0 netns "$ns" type veth peer name "$node" netns "$cns"
    ip -n "$cns" link set "$node" master br0 up
    ip -n "$ns" addr add "${NODE_UNDERLAY[$node]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$gw"
done
say "namespaces: $(ip netns list | grep -c "^$P-") created"

# ---------------------------------------------------------------------------------------------
step "4. Start the coordinator (SQLite in its data directory)"
show "ztnet-coordinator --data-dir $WORK/coord --trust-domain corp.example --listen $COORD_ADDR"
spawn "$NS_COORD" coordinator "$BIN/ztnet-coordinator" --data-dir "$WORK/coord" \
    --trust-domain corp.example --listen "$COORD_ADDR"
wait_for 30 test -s "$WORK/coord/admin.key" || { echo "coordinator wrote no admin.key" >&2; exit 1; }
wait_for 30 zt network list || { echo "the admin API does not answer" >&2; exit 1; }
say "admin API up; the first API key is in $WORK/coord/admin.key (mode $(stat -c %a \
"$WORK/coord/admin.key")), never printed"

# ---------------------------------------------------------------------------------------------
step "5. Create a zero-trust network and one join token per role"
zt_show network create --name prod-vpc --zero-trust
declare -A TOKEN
make_token() { # role namespace tag uses
    show "TOKEN_$1=\$(ztnet token create --network prod-vpc --namespace $2 --tag $3 --uses $4 --ttl 1h)"
    TOKEN[$1]=$(zt token create --network prod-vpc --namespace "$2" --tag "$3" --uses "$4" \
        --ttl 1h 2>/dev/null)
}
make_token web production web 2
make_token db production db 1
make_token ops ops ops 1
make_token stray production stray 1
say "tokens made (each carries the coordinator's address and CA fingerprint; shown once)"

# ---------------------------------------------------------------------------------------------
step "6. Start the five nodes; each enrolls with its token"
for node in "${NODES[@]}"; do
    role=${node%%[0-9]*}
    show "[$node] ZTNET_TOKEN=\$TOKEN_$role ztnet-node --coordinator $COORD_ADDR \
--state-dir $WORK/$node --name $node --interface ${NODE_IFACE[$node]}"
    spawn "$P-$node" "$node" env ZTNET_TOKEN="${TOKEN[$role]}" "$BIN/ztnet-node" \
        --coordinator "$COORD_ADDR" --state-dir "$WORK/$node" --name "$node" \
        --interface "${NODE_IFACE[$node]}"
done
all_online() {
    [[ $(zt node list --network prod-vpc --output json | jq '[.[] | select(.online)] | length') \
        == "${#NODES[@]}" ]]
}
wait_for 60 all_online || { echo "not every node came online" >&2; exit 1; }
zt_show node list --network prod-vpc
for node in "${NODES[@]}"; do
    NODE_OVERLAY[$node]=$(zt node list --network prod-vpc --output json | jq -r --arg n "$node" \
        '.[] | select(.name == $n) | .addresses[] | select(test("^[0-9.]+/"))' | cut -d/ -f1)
done
say "no policy yet, so every node has an empty netmap: nobody can reach anybody."

# ---------------------------------------------------------------------------------------------
step "7. Apply a default-deny policy"
cat >"$WORK/policy.toml" <<'EOF'
# web may reach db on PostgreSQL only; ops may reach everything; nothing else passes.
[[grant]]
from = ["tag:web"]
to = ["tag:db"]
ports = ["tcp:5432"]

[[grant]]
from = ["ns:ops"]
to = ["*"]
ports = ["any"]

[[test]]
from = { name = "web1", namespace = "production", tags = ["web"] }
to = { name = "db1", namespace = "production", tags = ["db"] }
port = "tcp:5432"
expect = "allow"

[[test]]
from = { name = "db1", namespace = "production", tags = ["db"] }
to = { name = "web1", namespace = "production", tags = ["web"] }
port = "tcp:5432"
expect = "deny"
EOF
show "cat policy.toml"
sed 's/^/    /' "$WORK/policy.toml"
zt_show policy apply --network prod-vpc -f "$WORK/policy.toml" --wait

# ---------------------------------------------------------------------------------------------
step "8. Traffic: what the policy allows passes, the rest is dropped"
for node in "${NODES[@]}"; do
    for port in 5432 22 8080; do
        spawn "$P-$node" "echo-$node-$port" socat "TCP-LISTEN:$port,reuseaddr,fork" EXEC:cat
    done
done
listening() { ip netns exec "$P-$1" socat -u /dev/null "TCP:127.0.0.1:$2,connect-timeout=1"; }
for node in "${NODES[@]}"; do wait_for 10 listening "$node" 8080; done

failures=0
tcp_probe() { # from to port
    printf 'ztnet-demo\n' | ip netns exec "$P-$1" socat -T 2 - \
        "TCP:${NODE_OVERLAY[$2]}:$3,connect-timeout=2" 2>/dev/null | grep -q ztnet-demo
}
ping_probe() { ip netns exec "$P-$1" ping -c 1 -W 2 "${NODE_OVERLAY[$2]}"; }
drops_of() { "$BIN/ztnet" status --interface "${NODE_IFACE[$1]}" --output json | jq -c .drops; }
# The counters that rose between two snapshots: "reason+N ...".
drops_diff() {
    jq -rn --argjson a "$1" --argjson b "$2" \
        '$b | to_entries | map(select(.value > ($a[.key] // 0)))
            | map("\(.key)+\(.value - ($a[.key] // 0))") | join(" ")'
}
expect() { # allow|deny description command from ...
    local want=$1 what=$2 got=deny from=$4 before after note=''
    shift 2
    before=$(drops_of "$from")
    if [[ $want == allow ]]; then
        wait_for 10 "$@" && got=allow
    else
        "$@" >/dev/null 2>&1 && got=allow
    fi
    if [[ $got == deny ]]; then
        after=$(drops_of "$from")
        note="  dropped at $from: $(drops_diff "$before" "$after")"
    fi
    if [[ $got == "$want" ]]; then
        printf '  %s%-6s%s %-52s%s%s%s\n' "$GREEN" "$got" "$RESET" "$what" "$DIM" "$note" "$RESET"
    else
        printf '  %s%-6s%s %s  (expected %s)\n' "$RED" "$got" "$RESET" "$what" "$want"
        failures=$((failures + 1))
    fi
}
expect allow "web1   -> db1    tcp:5432  (grant tag:web -> tag:db)" tcp_probe web1 db1 5432
expect allow "web2   -> db1    tcp:5432" tcp_probe web2 db1 5432
expect deny "web1   -> db1    tcp:22    (no grant)" tcp_probe web1 db1 22
expect deny "web1   -> db1    icmp" ping_probe web1 db1
expect deny "db1    -> web1   tcp:5432  (grants are one-way)" tcp_probe db1 web1 5432
expect deny "web1   -> web2   tcp:8080" tcp_probe web1 web2 8080
expect allow "ops1   -> web1   tcp:8080  (grant ns:ops -> *)" tcp_probe ops1 web1 8080
expect allow "ops1   -> db1    tcp:22" tcp_probe ops1 db1 22
expect allow "ops1   -> stray1 icmp" ping_probe ops1 stray1
expect deny "stray1 -> db1    tcp:5432  (stray1 has no grant)" tcp_probe stray1 db1 5432
expect deny "stray1 -> ops1   icmp      (replies only, never opens)" ping_probe stray1 ops1

# ---------------------------------------------------------------------------------------------
step "9. What the nodes see"
zt_show node list --network prod-vpc
show "ztnet status --interface ${NODE_IFACE[web1]}    # on web1"
"$BIN/ztnet" status --interface "${NODE_IFACE[web1]}"
show "ztnet status --interface ${NODE_IFACE[stray1]}    # on stray1: it knows only ops1"
"$BIN/ztnet" status --interface "${NODE_IFACE[stray1]}"
say ""
say "drop counters by reason, per node:"
for node in "${NODES[@]}"; do
    drops=$("$BIN/ztnet" status --interface "${NODE_IFACE[$node]}" --output json |
        jq -r '.drops | to_entries | map("\(.key)=\(.value)") | join(" ")')
    printf '  %-7s %s\n' "$node" "${drops:-none}"
done

step "10. The audit log"
zt_show audit --network prod-vpc

if ((failures)); then
    printf '\n%s%d traffic check(s) did not match the policy.%s\n' "$RED" "$failures" "$RESET"
    exit 1
fi
printf '\n%sEvery traffic check matched the policy.%s\n' "$GREEN" "$RESET"

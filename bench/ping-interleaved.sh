#!/usr/bin/env bash
# Ping latency, ztnet-node against boringtun-cli 0.7.1, measured fairly: both tunnels run at
# the same time between the same two namespaces (veth, offloads off, MTU 1420), and the pings
# alternate between them in rounds (ztnet, boringtun, ztnet, boringtun, ...), so that both see
# the same load on the machine. Prints each implementation's median and p90 over all rounds,
# the per-round medians, and how many rounds each won.
#
# With STRACE=1 it then counts the system calls each daemon makes per ping (strace -c -f on
# both ends, $STRACE_PINGS pings, syscalls per round trip for the pair).
#
# With TRACE=1 it records $STRACE_PINGS pings per implementation with perf (raw_syscalls and
# sched tracepoints, whole machine) and prints, for the daemons' threads, how long each kind
# of system call took, how long they ran in user space between two calls (median and mean,
# microseconds), and where their wake-ups landed. Tracing slows every call: compare the
# implementations with each other, not with the untraced medians.
#
# With PROFILE=1 it records a perf cpu-clock profile (20 kHz, call graphs, whole machine) of
# $STRACE_PINGS pings per implementation into $PROFILE_DIR (default /tmp), for `perf report`.
# RTT_DIR=dir keeps every round-trip time, one file per implementation.
#
# Needs root. Traffic stays inside the two namespaces it makes; it removes them and the
# processes it started when it ends, on failure too.
#
#   sudo bench/ping-interleaved.sh                 # 10 rounds of 100 pings each
#   ROUNDS=20 PINGS=50 ONLY="ztnet boringtun boringtun-1t" sudo -E bench/ping-interleaved.sh
#   NODE_BIN=/path/to/ztnet-node sudo -E bench/ping-interleaved.sh   # another build
#   ONLY="ztnet ztnet-alt1" ALT_BIN_1=/path/to/other/ztnet-node sudo -E bench/ping-interleaved.sh
set -euo pipefail

ROUNDS=${ROUNDS:-10}
PINGS=${PINGS:-100}
INTERVAL=${INTERVAL:-0.02}
ONLY=${ONLY:-"ztnet boringtun"}
STRACE=${STRACE:-0}
TRACE=${TRACE:-0}
STRACE_PINGS=${STRACE_PINGS:-200}
CACHE=${ZTNET_BENCH_CACHE:-$HOME/.cache/ztnet-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
declare -A DPID # impl,side -> daemon pid
declare -A DST  # impl -> overlay address of side b

[ "$(id -u)" = 0 ] || { echo "bench/ping-interleaved.sh needs root (namespaces, TUN)" >&2; exit 1; }
bench_init zp ping

for tool in wg ethtool bc ping; do
    command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq \
        wireguard-tools ethtool bc iputils-ping >/dev/null; break; }
done

echo "== building ztnet-node (release)" >&2
(cd "$ROOT" && cargo build --release -q -p ztnet-node)
cp "${NODE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ztnet-node}" "$WORK/ztnet-node"
ZTNET="$WORK/ztnet-node"
BTUN="$CACHE/bin/boringtun-cli"
if [ ! -x "$BTUN" ]; then
    echo "== installing boringtun-cli 0.7.1 into $CACHE" >&2
    cargo install -q boringtun-cli --version 0.7.1 --locked --root "$CACHE"
fi

in_a() { ip netns exec "$NS_A" "$@"; }

ip netns add "$NS_A"
ip netns add "$NS_B"
ip -n "$NS_A" link set lo up
ip -n "$NS_B" link set lo up
ip -n "$NS_A" link add va type veth peer name vb netns "$NS_B"
ip -n "$NS_A" addr add 192.0.2.1/24 dev va
ip -n "$NS_B" addr add 192.0.2.2/24 dev vb
for s in "$NS_A va" "$NS_B vb"; do
    set -- $s
    ip -n "$1" link set "$2" up
    ip netns exec "$1" ethtool -K "$2" tso off gso off gro off tx off rx off >/dev/null 2>&1 || true
done

umask 077
wg genkey >"$WORK/a.key"; wg genkey >"$WORK/b.key"
A_PUB=$(wg pubkey <"$WORK/a.key"); B_PUB=$(wg pubkey <"$WORK/b.key")

# Each implementation gets its own listen port and overlay subnet.
n=0
for impl in $ONLY; do
    n=$((n + 1))
    port=$((51820 + n)) net=10.98.$n
    DST[$impl]=$net.2
    case $impl in
    ztnet | ztnet-alt*)
        allow_all_policy >"$WORK/policy.toml"
        for side in a b; do
            ns=$NS_A
            [ $side = b ] && ns=$NS_B
            ztnet_config "$side" "${TAG}z$n$side" "$net" "$port" >"$WORK/$impl.$side.toml"
            # ztnet-altN: the binary $ALT_BIN_N (default: the same one) with the environment in
            # $ALT_ENV_N (or $ALT_ENV).
            envs=() bin=$ZTNET
            if [ "$impl" != ztnet ]; then
                var=ALT_ENV_${impl#ztnet-alt}
                read -r -a envs <<<"${!var:-${ALT_ENV:-}}"
                var=ALT_BIN_${impl#ztnet-alt}
                if [ -n "${!var:-}" ]; then
                    bin=$WORK/ztnet-node.$impl
                    [ -e "$bin" ] || cp "${!var}" "$bin"
                fi
            fi
            env "${envs[@]}" RUST_LOG=warn ip netns exec "$ns" "$bin" \
                --config "$WORK/$impl.$side.toml" >>"$WORK/ztnet.log" 2>&1 &
            DPID[$impl,$side]=$!
            PIDS+=($!)
            wait_until "[ -S /var/run/ztnet/${TAG}z$n$side.sock ]"
        done
        ;;
    boringtun | boringtun-1t | ztnet-wg)
        # ztnet-wg: ztnet-node in plain WireGuard mode (no identity filter), set up with `wg`
        # exactly as boringtun-cli is.
        extra=()
        [ "$impl" = boringtun-1t ] && extra=(--threads 1)
        for side in a b; do
            ns=$NS_A
            [ $side = b ] && ns=$NS_B
            ifc=${TAG}b$n$side
            if [ "$impl" = ztnet-wg ]; then
                RUST_LOG=warn ip netns exec "$ns" "$ZTNET" wg --foreground "$ifc" \
                    >>"$WORK/$impl.log" 2>&1 &
            else
                ip netns exec "$ns" "$BTUN" --foreground --disable-drop-privileges \
                    "${extra[@]}" "$ifc" >>"$WORK/$impl.log" 2>&1 &
            fi
            DPID[$impl,$side]=$!
            PIDS+=($!)
            wait_until "[ -S /var/run/wireguard/$ifc.sock ]"
            wg_configure "$side" "$ifc" "$net" "$port"
        done
        ;;
    *) echo "unknown implementation $impl (ztnet, ztnet-altN, ztnet-wg, boringtun, boringtun-1t)" >&2; exit 1 ;;
    esac
    wait_until "in_a ping -c1 -W1 ${DST[$impl]}"
done

# Median and p90 of the numbers in a file.
stats() { sort -n "$1" | awk '{ v[NR] = $1 } END {
    printf "%.3f %.3f %d\n", v[int((NR + 1) / 2)], v[int(NR * 0.9 + 0.5)], NR }'; }

echo "== $ROUNDS rounds of $PINGS pings, interval ${INTERVAL}s, $ONLY, each round starting one further" >&2
declare -A WINS
read -r -a IMPLS <<<"$ONLY"
for r in $(seq 1 "$ROUNDS"); do
    best="" bestv=""
    line="round $r:"
    # Each round starts with the next implementation, so that none is always first (or always
    # right after another one).
    order=()
    for i in "${!IMPLS[@]}"; do order+=("${IMPLS[$(( (i + r - 1) % ${#IMPLS[@]} ))]}"); done
    for impl in "${order[@]}"; do
        in_a ping -n -c "$PINGS" -i "$INTERVAL" "${DST[$impl]}" |
            sed -n 's/.*time=\([0-9.]*\).*/\1/p' >"$WORK/round.txt"
        cat "$WORK/round.txt" >>"$WORK/$impl.rtt"
        med=$(stats "$WORK/round.txt" | cut -d' ' -f1)
        line="$line $impl $med"
        if [ -z "$bestv" ] || [ "$(echo "$med < $bestv" | bc)" = 1 ]; then best=$impl bestv=$med; fi
    done
    WINS[$best]=$(( ${WINS[$best]:-0} + 1 ))
    echo "$line" >&2
done

printf '\n%-14s %10s %10s %8s %12s\n' implementation "median ms" "p90 ms" pings "rounds won"
for impl in $ONLY; do
    read -r med p90 cnt < <(stats "$WORK/$impl.rtt")
    printf '%-14s %10s %10s %8s %12s\n' "$impl" "$med" "$p90" "$cnt" "${WINS[$impl]:-0}/$ROUNDS"
done
echo "(load average $(cut -d' ' -f1-3 /proc/loadavg))"
# RTT_DIR=dir keeps every implementation's round-trip times there, one per line (ms).
if [ -n "${RTT_DIR:-}" ]; then
    mkdir -p "$RTT_DIR"
    for impl in $ONLY; do cp "$WORK/$impl.rtt" "$RTT_DIR/$impl.rtt"; done
fi

# Context switches (thread wake-ups) of both daemons per round trip: voluntary ones are a
# thread going to sleep and being woken again.
ctx() { # pid...
    local t=0 p f
    for p in "$@"; do
        for f in /proc/"$p"/task/*/status; do
            t=$((t + $(awk '/^voluntary_ctxt_switches/ { print $2 }' "$f" 2>/dev/null || echo 0)))
        done
    done
    echo $t
}
echo
# Nanoseconds on a CPU, all threads of the processes given (the first field of schedstat).
oncpu() { # pid...
    local t=0 p f
    for p in "$@"; do
        for f in /proc/"$p"/task/*/schedstat; do
            t=$((t + $(cut -d' ' -f1 "$f" 2>/dev/null || echo 0)))
        done
    done
    echo "$t"
}

echo "per round trip, both daemons, $STRACE_PINGS pings: thread wake-ups (voluntary context"
echo "switches) and time on a CPU (schedstat, user and kernel, microseconds):"
for impl in $ONLY; do
    c0=$(ctx "${DPID[$impl,a]}" "${DPID[$impl,b]}")
    t0=$(oncpu "${DPID[$impl,a]}" "${DPID[$impl,b]}")
    in_a ping -n -q -c "$STRACE_PINGS" -i "$INTERVAL" "${DST[$impl]}" >/dev/null
    t1=$(oncpu "${DPID[$impl,a]}" "${DPID[$impl,b]}")
    c1=$(ctx "${DPID[$impl,a]}" "${DPID[$impl,b]}")
    printf '  %-14s %6s wake-ups %8s us on CPU\n' "$impl" \
        "$(echo "scale=2; ($c1 - $c0) / $STRACE_PINGS" | bc)" \
        "$(echo "scale=1; ($t1 - $t0) / $STRACE_PINGS / 1000" | bc)"
done
if [ "${CPU_THREADS:-0}" = 1 ]; then
    echo "time on a CPU per round trip by thread (microseconds, both daemons):"
    for impl in $ONLY; do
        declare -A before=()
        for p in "${DPID[$impl,a]}" "${DPID[$impl,b]}"; do
            for d in /proc/"$p"/task/*; do before[$d]=$(cut -d' ' -f1 "$d/schedstat"); done
        done
        in_a ping -n -q -c "$STRACE_PINGS" -i "$INTERVAL" "${DST[$impl]}" >/dev/null
        declare -A by=()
        for d in "${!before[@]}"; do
            n=$(cat "$d/comm"); by[$n]=$(( ${by[$n]:-0} + $(cut -d' ' -f1 "$d/schedstat") - ${before[$d]} ))
        done
        line="  $impl:"
        for n in "${!by[@]}"; do line="$line $n $(echo "scale=1; ${by[$n]} / $STRACE_PINGS / 1000" | bc)"; done
        echo "$line"
        unset before by
    done
fi

if [ "$STRACE" = 1 ]; then
    command -v strace >/dev/null || { echo "no strace" >&2; exit 0; }
    echo
    echo "system calls per round trip (both daemons, $STRACE_PINGS pings, strace -c -f):"
    for impl in $ONLY; do
        for side in a b; do
            strace -c -f -q -o "$WORK/strace.$impl.$side" -p "${DPID[$impl,$side]}" &
            PIDS+=($!)
        done
        sleep 1 # strace attaches asynchronously; no signal says it is ready
        in_a ping -n -q -c "$STRACE_PINGS" -i "$INTERVAL" "${DST[$impl]}" >/dev/null
        for side in a b; do
            kill -INT "${PIDS[-1]}" 2>/dev/null || true
            wait "${PIDS[-1]}" 2>/dev/null || true
            unset 'PIDS[-1]'
        done
        for side in a b; do
            total=$(awk '$NF == "total" { print $4 }' "$WORK/strace.$impl.$side")
            per=$(echo "scale=1; ${total:-0} / $STRACE_PINGS" | bc)
            calls=$(awk 'NR > 2 && $NF != "total" && $1 !~ /^-/ {
                printf "%s=%s ", $NF, $4 }' "$WORK/strace.$impl.$side")
            echo "  $impl side $side: $per per ping ($calls)"
        done
    done
fi

if [ "$TRACE" = 1 ]; then
    command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
    command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 >/dev/null; }
    cat >"$WORK/trace.py" <<'EOF'
# Reads `perf script` lines; prints syscall durations, user-space gaps between calls and
# wake-up placement for the threads whose command name is in argv[1] (comma-separated).
import re, statistics, sys
from collections import defaultdict
names = set(sys.argv[1].split(","))
WAITS = {7, 232, 271}  # poll, epoll_wait, ppoll: their time is sleep, not work
enter, last, dur, gap = {}, {}, defaultdict(list), defaultdict(list)
place = defaultdict(int)
line_re = re.compile(r"\s*(\S.*?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")
for line in sys.stdin:
    m = line_re.match(line)
    if not m:
        continue
    comm, tid, cpu, t, ev, rest = m.groups()
    tid, cpu, t = int(tid), int(cpu), float(t) * 1e6
    if ev == "sched:sched_waking":
        w = re.search(r"comm=(\S+) pid=(\d+) .*target_cpu=(\d+)", rest)
        if w and w.group(1) in names:
            place["own CPU" if int(w.group(3)) == cpu else "other CPU"] += 1
        continue
    if comm not in names or not ev.startswith("raw_syscalls:sys_"):
        continue
    nr = int(re.search(r"NR (\d+)", rest).group(1))
    if ev.endswith("enter"):
        enter[tid] = (nr, t)
        if tid in last:
            pnr, pt = last[tid]
            gap[("after wait" if pnr in WAITS else f"after {pnr}", nr)].append(t - pt)
    else:
        if tid in enter and enter[tid][0] == nr and nr not in WAITS:
            dur[nr].append(t - enter[tid][1])
        last[tid] = (nr, t)
print("  system call (x86-64 number): count, median us, mean us")
for nr in sorted(dur):
    v = dur[nr]
    if len(v) >= 20:
        print(f"    {nr:4d}: {len(v):6d} {statistics.median(v):7.1f} {statistics.mean(v):7.1f}")
print("  user space between calls (previous -> next call): count, median us, mean us")
for k in sorted(gap, key=str):
    v = gap[k]
    if len(v) >= 20:
        print(f"    {k[0]:>12s} -> {k[1]:3d}: {len(v):6d} {statistics.median(v):7.1f} {statistics.mean(v):7.1f}")
print("  wake-ups by the waker's CPU: " + ", ".join(f"{n} on the {p}" for p, n in sorted(place.items())))
EOF
    echo
    echo "traced, $STRACE_PINGS pings each (perf; tracing inflates every duration):"
    for impl in $ONLY; do
        perf record -q -a -o "$WORK/perf.data" -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit \
            -e sched:sched_waking -e sched:sched_switch -- \
            ip netns exec "$NS_A" ping -n -q -c "$STRACE_PINGS" -i "$INTERVAL" "${DST[$impl]}" \
            >/dev/null 2>&1
        case $impl in
        ztnet*) threads=ztnet-udp,ztnet-tun ;;
        *) threads=boringtun-cli ;;
        esac
        echo "$impl ($threads):"
        perf script -i "$WORK/perf.data" 2>/dev/null | python3 "$WORK/trace.py" "$threads"
        rm -f "$WORK/perf.data"
    done
fi

if [ "${PROFILE:-0}" = 1 ]; then
    command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
    OUT=${PROFILE_DIR:-/tmp}
    echo
    echo "perf cpu-clock profiles at 20 kHz, $STRACE_PINGS pings each, whole machine:"
    for impl in $ONLY; do
        perf record -q -a -g -F 20000 -e cpu-clock -o "$OUT/ztnet-ping-$impl.perf" -- \
            ip netns exec "$NS_A" ping -n -q -c "$STRACE_PINGS" -i "$INTERVAL" "${DST[$impl]}" \
            >/dev/null 2>&1
        echo "  $impl: $OUT/ztnet-ping-$impl.perf (daemon pids ${DPID[$impl,a]} ${DPID[$impl,b]})"
    done
fi

#!/bin/sh
# Instructions (and simulated cache misses: a 32 KiB 8-way L1 data cache and a 1 MiB 16-way L2,
# as on this project's 2-core EPYC VM) per decided packet, for each per-packet scenario of
# the criterion benches, counted by valgrind's cachegrind: unlike time, not moved by the load of
# a shared machine. Each scenario runs twice, with N1 and N2 packets after the same setup; the
# difference of the counts divided by N2 - N1 is the cost of one packet.
#
#   cargo build --release -p netpolicy --example packet_cost
#   netpolicy/benches/instructions.sh [SCENARIO...]
set -eu
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${PACKET_COST:-$here/target/release/examples/packet_cost}
n1=${N1:-20000}
n2=${N2:-120000}
[ -x "$bin" ] || { echo "build it first: cargo build --release -p netpolicy --example packet_cost" >&2; exit 1; }
scenarios=${*:-established established-ref established-large established-large-ref new new-ref new-small deny}

# Prints "instructions D1-misses LL-misses" (read and write misses summed) for one run.
count() {
    valgrind --tool=cachegrind --cache-sim=yes --cachegrind-out-file=/dev/null \
        --I1=32768,8,64 --D1=32768,8,64 --LL=1048576,16,64 \
        "$bin" "$1" "$2" 2>&1 >/dev/null | awk '
        { gsub(",", "") }
        /I *refs:/ { i = $NF }
        /D1  misses:/ { d1 = $4 }
        /LLd misses:/ { ll = $4 }
        END { print i, d1, ll }'
}

printf '%-24s %12s %10s %10s\n' scenario instr/packet L1d-miss L2-miss
for s in $scenarios; do
    set -- $(count "$s" "$n1")
    i1=$1 d1=$2 l1=$3
    set -- $(count "$s" "$n2")
    awk -v s="$s" -v i1="$i1" -v i2="$1" -v d1="$d1" -v d2="$2" -v l1="$l1" -v l2="$3" \
        -v n="$((n2 - n1))" 'BEGIN {
        printf "%-24s %12.1f %10.2f %10.2f\n", s, (i2 - i1) / n, (d2 - d1) / n, (l2 - l1) / n }'
done

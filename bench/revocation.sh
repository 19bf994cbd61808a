#!/usr/bin/env bash
# Revocation bound benchmark (issue 6): runs the 20-node end-to-end measurement of
# integration/tests/e2e_scale.rs $RUNS times with $VICTIMS rounds each (8 by default, the most
# one 20-node mesh holds), each round revoking one node while six peers keep a TCP and a UDP
# flow open towards it, and prints p50 / p99 / max over every per-peer sample:
#   - "after return": from `ztnet node revoke` returning to the last packet of the revoked node
#     that the peer accepted (the issue's figure; 0 when the peer refused it before the command
#     returned), and
#   - "from start": the same, counted from the moment the command was started (CLI start, TLS
#     handshake and the coordinator's work included).
#
# Needs root. Everything runs inside namespaces the test makes and removes (see the test).
#
#   sudo bench/revocation.sh                 # 3 runs x 8 rounds x 6 peers = 144 samples
#   RUNS=1 VICTIMS=4 PROFILE=debug bench/revocation.sh
#   SKIP_BUILD=1 ...                        # the binaries in target/$PROFILE as they are
set -euo pipefail

RUNS=${RUNS:-3}
VICTIMS=${VICTIMS:-8}
PROFILE=${PROFILE:-release}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/ztnet-revbench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

[ "$(id -u)" = 0 ] || { echo "bench/revocation.sh needs root (namespaces, TUN)" >&2; exit 1; }
for tool in socat nft ping; do
    command -v "$tool" >/dev/null || { echo "bench/revocation.sh needs $tool" >&2; exit 1; }
done

flag=()
[ "$PROFILE" = release ] && flag=(--release)
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    echo "== using the $PROFILE binaries already built" >&2
else
    echo "== building the binaries ($PROFILE)" >&2
    (cd "$ROOT" && cargo build -q "${flag[@]}" --workspace --bins)
fi

for run in $(seq 1 "$RUNS"); do
    echo "== run $run of $RUNS ($VICTIMS rounds)" >&2
    (cd "$ROOT" && ZTNET_SCALE_VICTIMS=$VICTIMS cargo test -q "${flag[@]}" \
        -p ztnet-integration --test e2e_scale -- --nocapture --test-threads 1) \
        >"$WORK/run$run.log" 2>&1 || { tail -40 "$WORK/run$run.log" >&2; exit 1; }
    grep -h '^revocation-sample' "$WORK/run$run.log" >>"$WORK/samples"
done

# Nearest-rank quantiles over one column of numbers.
stats() {
    sort -n | awk -v what="$1" '{ v[NR] = $1 } END {
        if (NR == 0) { print what ": no samples"; exit 1 }
        r50 = int(NR * 0.50); if (r50 < NR * 0.50) r50++; if (r50 < 1) r50 = 1
        r99 = int(NR * 0.99); if (r99 < NR * 0.99) r99++; if (r99 < 1) r99 = 1
        printf "%-13s %4d samples  p50 %5d ms  p99 %5d ms  max %5d ms\n", what, NR, v[r50], v[r99], v[NR]
    }'
}
echo "revocation, 20 nodes, $PROFILE build, $RUNS runs x $VICTIMS rounds x 6 peers"
sed -n 's/.* ms=\([0-9]*\) .*/\1/p' "$WORK/samples" | stats "after return"
sed -n 's/.*from_start_ms=\([0-9]*\).*/\1/p' "$WORK/samples" | stats "from start"

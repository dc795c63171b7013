#!/usr/bin/env bash
# A fuzzing campaign: the given cargo-fuzz targets one after another, SECS each, each
# seeded with its checked-in corpus, growing a scratch corpus, crashes kept under OUT.
# Appends one line per target to OUT/log: wall time, CPU time (user + sys; what a shared
# machine actually gave it), executions, new coverage units, peak RSS.
#
#   vmm/fuzz/campaign.sh SECS TARGET...        (after `cargo +nightly fuzz build -s address -O`
#                                               in vmm/ and host-shim/)
#   CARGO_TARGET_DIR  where the fuzz builds are (default: the workspace's target/)
#   OUT               results (default /tmp/husk-fuzz); SCRATCH grown corpora (default /tmp/fuzzwork)
#
# Device targets live in vmm/fuzz, huskd's in host-shim/fuzz; docs/fuzzing.md lists them.
set -u
[ $# -ge 2 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
secs=$1
shift
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release
out=${OUT:-/tmp/husk-fuzz}
scratch=${SCRATCH:-/tmp/fuzzwork}
mkdir -p "$out"
TIMEFORMAT="cpu user %U s sys %S s"
for t in "$@"; do
    if [ -f "$repo/vmm/fuzz/fuzz_targets/$t.rs" ]; then crate=vmm
    elif [ -f "$repo/host-shim/fuzz/fuzz_targets/$t.rs" ]; then crate=host-shim
    else echo "campaign: no target $t" >&2; exit 2; fi
    [ -x "$bin/$t" ] || { echo "campaign: $bin/$t not built" >&2; exit 2; }
    mkdir -p "$scratch/$t" "$out/artifacts/$t"
    start=$(date +%s)
    echo "== $t start $(date -u +%FT%TZ)" >>"$out/log"
    { time (cd "$repo/$crate" && "$bin/$t" "$scratch/$t" "fuzz/corpus/$t" -max_total_time="$secs" \
        -timeout=20 -rss_limit_mb=4096 -artifact_prefix="$out/artifacts/$t/" -print_final_stats=1 \
        >"$out/$t.log" 2>&1); } 2>"$out/$t.cpu"
    rc=$?
    echo "== $t end rc=$rc wall=$(($(date +%s) - start))s $(cat "$out/$t.cpu") $(grep -E 'stat::(number_of_executed_units|new_units_added|peak_rss_mb)' "$out/$t.log" | tr -s ' ' | tr '\n' ' ')" >>"$out/log"
done

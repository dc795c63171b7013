#!/usr/bin/env bash
# Build husk-agent as a static binary for the guest (glibc static-pie; there is
# no musl target here) and run the agent test suite against that binary.
# Usage: guest-agent/scripts/check-static.sh   (about 4 minutes cold on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
target_dir="${CARGO_TARGET_DIR:-target}-static"
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
  cargo build -p husk-agent --target x86_64-unknown-linux-gnu
bin="$target_dir/x86_64-unknown-linux-gnu/debug/husk-agent"
if readelf -d "$bin" | grep -q NEEDED; then
  echo "FAIL: $bin needs shared libraries:" >&2
  readelf -d "$bin" | grep NEEDED >&2
  exit 1
fi
file "$bin"
HUSK_AGENT_BIN="$(realpath "$bin")" cargo test -p husk-agent --tests

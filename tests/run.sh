#!/usr/bin/env bash
# The test command: installs what the tests need, builds every binary,
# runs every test (unit, integration, end to end). Needs root (mounts,
# namespaces, KVM, chown in image unpacking).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: sudo bash tests/run.sh" >&2; exit 1; }
bash tests/install-deps.sh
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"

#!/usr/bin/env bash
# The main job, from a fresh Debian 12 host: install what husk needs, build
# it, start huskd with a local registry holding a busybox image, and use it
# through the husk CLI (a CRI client).
#
# The pod runs in a VM: handler husk-qemu (QEMU with KVM where the CPU has
# hardware virtualisation, else TCG software emulation), booting the guest
# kernel and initramfs built by images/ (cached under /var/cache/husk/guest;
# the first build takes a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: bash tests/demo.sh (as root, or through sudo)" >&2; exit 1; }
bash tests/install-deps.sh
cargo build --workspace --bins --locked
bin=${CARGO_TARGET_DIR:-target}/debug
kernel=$(bash images/build-kernel.sh)/bzImage
initrd=$(bash images/build-initramfs.sh)
# Short: pod sockets go below $work/run (config.rs: run_dir at most 24 bytes).
work=$(mktemp -d /tmp/husk.XXXXXX)
cleanup() {
  [ -n "${huskd_pid:-}" ] && kill "$huskd_pid" 2>/dev/null || true
  [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
reg=127.0.0.1:$port
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: $reg}
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 & reg_pid=$!
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
$bin/husk-testimage busybox "$reg" library/busybox:latest

# docker.io resolves through the local registry as a mirror (hosts.toml).
mkdir -p "$work/certs.d/docker.io"
cat > "$work/certs.d/docker.io/hosts.toml" <<TOML
server = "https://registry-1.docker.io"
[host."http://$reg"]
  capabilities = ["pull", "resolve"]
TOML
cat > "$work/config.toml" <<TOML
socket = "$work/huskd.sock"
state_dir = "$work/state"
run_dir = "$work/run"
[image]
registry_config_dir = "$work/certs.d"
[runtime]
default_handler = "husk-qemu"
[runtime.vm]
kernel = "$kernel"
initrd = "$initrd"
TOML
$bin/huskd --config "$work/config.toml" 2>"$work/huskd.log" & huskd_pid=$!
for _ in $(seq 100); do [ -S "$work/huskd.sock" ] && break; sleep 0.1; done
export HUSK_SOCKET=$work/huskd.sock

set -x
$bin/husk version
$bin/husk pull busybox
$bin/husk images
$bin/husk inspecti busybox | head -12
# The main job: a pod sandbox (a VM) running a command. The guest kernel
# differs from the host's.
uname -r
$bin/husk run --rm --log-root "$work/logs" busybox -- sh -c 'echo hello from a husk pod; uname -r; id; hostname'
# The same in the namespace sandbox (container-level isolation, not a VM).
$bin/husk run --rm --runtime husk-ns --log-root "$work/logs" busybox -- sh -c 'echo hello from a husk-ns pod; uname -r'
$bin/husk rmi busybox
$bin/husk images

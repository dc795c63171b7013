#!/usr/bin/env bash
# Installs the Debian 12 packages husk's build, tests and benchmarks use.
# Idempotent; needs root.
set -euo pipefail
pkgs=(
  protobuf-compiler   # protoc, for the CRI protos (k8s-cri)
  docker-registry     # a real OCI registry for pull tests
  apache2-utils       # htpasswd (bcrypt) for the private-registry test
  busybox-static      # test image content and container rootfs
  containerd          # benchmark baseline (ctr image pull)
  runc
  iproute2            # ip, tc (pod networking, tests)
  containernetworking-plugins  # CNI plugins (/usr/lib/cni) for pod networking
  iptables            # portmap/bridge plugins
  openssl
  e2fsprogs
  erofs-utils
  # guest kernel and initramfs (images/)
  linux-source-6.12
  bc
  bison
  flex
  libelf-dev
  libssl-dev
  cpio
  xz-utils
  make
  qemu-system-x86     # VM sandbox backend (TCG where KVM cannot run Linux)
  socat               # nested test bed (tests/nested/): vsock and control-socket ends
  python3-kubernetes  # the official Python client: independent check of the streaming wire format
  python3-grpcio      # an independent gRPC client (gRPC core in C): CRI :authority forms
  golang-go           # grpc-go, kubelet's and crictl's gRPC stack (tests/clients/grpc-go, built offline)
  golang-google-grpc-dev
  golang-google-protobuf-dev
  golang-golang-x-net-dev
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# docker-registry's package starts a system registry on :5000; tests start their own.
systemctl stop docker-registry 2>/dev/null || true
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

#!/usr/bin/env bash
# Builds (or reuses) the guest initramfs: the static husk-agent as /init plus
# the few nodes and directories it needs before it mounts the rest.
# Cached by the agent binary's hash; prints the initramfs path on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out_root=${HUSK_GUEST_DIR:-/var/cache/husk/guest}
target=x86_64-unknown-linux-gnu
echo "initramfs: building static husk-agent" >&2
# The `guest` profile (Cargo.toml): size-optimised, whole-program LTO, no symbols. The binary
# sits in the guest's tmpfs root, so its size is guest RAM in every pod (8.6 -> 4.9 MB).
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --profile guest -p husk-agent --target $target)
agent=${CARGO_TARGET_DIR:-$repo/target}/$target/guest/husk-agent
if readelf -l "$agent" | grep -q "program interpreter"; then echo "husk-agent is not static" >&2; exit 1; fi
hash=$( { sha256sum "$agent"; cat "$0"; } | sha256sum | cut -c1-16)
out=$out_root/initramfs-$hash.cpio.gz
if [ -f "$out" ]; then echo "initramfs: cached $out" >&2; echo "$out"; exit 0; fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,run,tmp,etc,mnt}
install -m 0755 "$agent" "$stage/init"
strip --strip-debug "$stage/init"
mknod -m 0600 "$stage/dev/console" c 5 1
mknod -m 0666 "$stage/dev/null" c 1 3
mkdir -p "$out_root"
(cd "$stage" && find . -print0 | sort -z | cpio --null -o -H newc --quiet | gzip -9n) > "$out.tmp.$$"
mv "$out.tmp.$$" "$out"
# Older builds go once they are a day old: a running huskd (or a concurrent test run) may
# still be configured with one.
find "$out_root" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -path "$out" -mmin +1440 -delete
echo "initramfs: built $out ($(du -h "$out" | cut -f1))" >&2
echo "$out"

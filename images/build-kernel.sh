#!/usr/bin/env bash
# Builds (or reuses) the husk guest kernel from Debian's linux-source-6.12:
# tinyconfig + kernel/configs/kvm_guest.config + images/guest-kernel.config,
# then checks images/required-options.txt against the final .config.
# Cached by a hash of its inputs; prints the artifact directory
# (bzImage, vmlinux, config) on stdout. HUSK_GUEST_DIR sets the cache
# (default /var/cache/husk/guest). Packages: tests/install-deps.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out_root=${HUSK_GUEST_DIR:-/var/cache/husk/guest}
src_tar=/usr/src/linux-source-6.12.tar.xz
[ -f "$src_tar" ] || { echo "missing $src_tar: apt-get install linux-source-6.12" >&2; exit 1; }
ver=$(dpkg-query -W -f='${Version}' linux-source-6.12)
hash=$( { echo "$ver"; cat "$here/guest-kernel.config" "$here/required-options.txt" "$0"; } | sha256sum | cut -c1-16)
out=$out_root/kernel-$hash
mkdir -p "$out_root"
# One build per input hash at a time: a second caller waits and then finds it cached
# (two builds of one hash used to delete each other's tree).
exec 9>"$out_root/.kernel-$hash.lock"
flock 9
if [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ]; then
  echo "guest kernel: cached $out" >&2
  echo "$out"
  exit 0
fi
build=$out_root/build-kernel-$hash
rm -rf "$build" "$out.tmp"
mkdir -p "$build"
echo "guest kernel: unpacking linux-source $ver" >&2
tar -C "$build" -xf "$src_tar"
cd "$build"/linux-source-6.12
make -s tinyconfig
scripts/kconfig/merge_config.sh -m .config kernel/configs/kvm_guest.config "$here/guest-kernel.config" >/dev/null
make -s olddefconfig
missing=()
while read -r opt; do
  grep -q "^$opt=y$" .config || missing+=("$opt")
done < <(grep -v '^#' "$here/required-options.txt" | grep .)
if ((${#missing[@]})); then
  echo "guest kernel: required options missing from the final .config (a dependency is off?):" >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi
echo "guest kernel: building bzImage with -j$(nproc) (about 4 minutes on 2 idle cores)" >&2
if ! make -j"$(nproc)" bzImage >build.log 2>&1; then
  tail -40 build.log >&2
  exit 1
fi
mkdir -p "$out.tmp"
cp arch/x86/boot/bzImage vmlinux "$out.tmp/"
mv .config "$out.tmp/config"
mv "$out.tmp" "$out"
cd /
rm -rf "$build"
# Older kernels go once they are a day old: a running huskd may still be configured with one.
find "$out_root" -maxdepth 1 -name 'kernel-*' ! -path "$out" -mmin +1440 -exec rm -rf {} +
echo "guest kernel: built $out" >&2
echo "$out"

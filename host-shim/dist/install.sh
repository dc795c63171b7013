#!/usr/bin/env bash
# Installs husk on this node: huskd, the husk CLI, husk-vmm and husk-agent, the
# guest kernel + initramfs, an example /etc/husk/config.toml and huskd.service;
# enables and starts the service where systemd runs. `--uninstall` removes what
# an install put there (the config stays unless --purge; pods are not touched).
#
#   bash host-shim/dist/install.sh [--no-build] [--bin-dir DIR] [--no-start]
#        [--guest-kernel FILE --guest-initrd FILE | --no-guest]
#   bash host-shim/dist/install.sh --uninstall [--purge]
#
# PREFIX (default /usr/local) is where binaries go; DESTDIR (default empty) is
# prepended to every installed path (packaging, tests: nothing is started then).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
bins=(huskd husk husk-vmm husk-agent)
manifest_rel=/var/lib/husk/install-manifest

mode=install build=1 start=1 guest=1 purge=0 bin_dir="" kernel="" initrd=""
while (($#)); do
  case $1 in
    --uninstall) mode=uninstall ;;
    --purge) purge=1 ;;
    --no-build) build=0 ;;
    --no-start) start=0 ;;
    --no-guest) guest=0 ;;
    --bin-dir) bin_dir=$2; shift ;;
    --guest-kernel) kernel=$2; shift ;;
    --guest-initrd) initrd=$2; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || [ -n "$DESTDIR" ] || { echo "install.sh: run as root" >&2; exit 1; }
systemd_live() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

if [ "$mode" = uninstall ]; then
  manifest=$DESTDIR$manifest_rel
  [ -f "$manifest" ] || { echo "install.sh: nothing installed ($manifest missing)" >&2; exit 1; }
  if systemd_live; then
    systemctl disable --now huskd.service || true
  fi
  while IFS= read -r f; do
    rm -f "$DESTDIR$f"
    echo "removed $f"
  done < "$manifest"
  rm -f "$manifest"
  if ((purge)); then
    rm -f "$DESTDIR/etc/husk/config.toml"
    rmdir "$DESTDIR/etc/husk" 2>/dev/null || true
  fi
  rmdir "$DESTDIR/var/lib/husk/guest" 2>/dev/null || true
  systemd_live && systemctl daemon-reload
  echo "husk uninstalled; pods still running keep running (remove them first: crictl rmp -af)"
  exit 0
fi

if [ -z "$bin_dir" ]; then
  bin_dir=${CARGO_TARGET_DIR:-$repo/target}/release
  if ((build)); then
    (cd "$repo" && cargo build --release --locked -p husk-host -p husk-vmm -p husk-agent --bins)
  fi
fi
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "install.sh: $bin_dir/$b missing (build first, or --bin-dir)" >&2; exit 1; }
done
if ((guest)) && [ -z "$kernel" ]; then
  kernel=$(cd "$repo" && bash images/build-kernel.sh)/bzImage
  initrd=$(cd "$repo" && bash images/build-initramfs.sh)
fi

installed=()
put() { # put MODE SRC DEST (DEST without DESTDIR)
  install -D -m "$1" "$2" "$DESTDIR$3"
  installed+=("$3")
}
for b in "${bins[@]}"; do
  put 0755 "$bin_dir/$b" "$PREFIX/bin/$b"
done
if ((guest)); then
  put 0644 "$kernel" /var/lib/husk/guest/bzImage
  put 0644 "$initrd" /var/lib/husk/guest/initramfs.cpio.gz
fi
unit=$(mktemp)
trap 'rm -f "$unit"' EXIT
sed "s|@PREFIX@|$PREFIX|g" "$here/huskd.service" > "$unit"
put 0644 "$unit" /etc/systemd/system/huskd.service
if [ -e "$DESTDIR/etc/husk/config.toml" ]; then
  echo "kept the existing /etc/husk/config.toml"
else
  install -D -m 0644 "$here/config.toml" "$DESTDIR/etc/husk/config.toml"
fi
install -d -m 0700 "$DESTDIR/var/lib/husk"
printf '%s\n' "${installed[@]}" > "$DESTDIR$manifest_rel"
echo "installed: ${installed[*]}"

if systemd_live && ((start)); then
  systemctl daemon-reload
  systemctl enable huskd.service
  # A running huskd is restarted onto the new binaries; its pods keep running.
  systemctl restart huskd.service
  systemctl --no-pager status huskd.service | head -5
elif ((start)); then
  echo "systemd is not running here: start huskd with $PREFIX/bin/huskd --config /etc/husk/config.toml"
fi

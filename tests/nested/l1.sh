#!/usr/bin/env bash
# Nested test bed: an L1 "node VM" under QEMU/TCG whose emulated AMD CPU has
# SVM + nested paging, so Linux in it loads kvm_amd and offers a real /dev/kvm
# to husk-vmm (this machine's own /dev/kvm, kvm-pvm, runs no Linux guest).
#
#   l1.sh prepare                  -> prints the cache dir (vmlinuz, base.cpio)
#   l1.sh stage ROOT FILE...       -> copies executables into ROOT/husk/bin with
#                                     the libraries ldd lists and the loader
#   l1.sh boot WORKDIR ROOT        -> packs ROOT into the initramfs and runs QEMU
#                                     in the foreground; console in
#                                     WORKDIR/console.log, commands over
#                                     WORKDIR/cmd.sock (see init below)
#   l1.sh testguest OUT.cpio       -> a busybox + socat initramfs for Linux tests
#                                     of husk-vmm (tests/nested/guest-init as
#                                     /init; append a cpio with /test.sh)
#   l1.sh stage-qemu ROOT          -> QEMU (+ libraries, firmware) for bootratio.sh
#   l1.sh boot-host WORKDIR VMM    -> like boot, but L1's root is this host's
#                                     root (read-only, served by VMM's vhost-user
#                                     fs server) under an overlay in L1's RAM:
#                                     every host path, every write kept in L1
#   l1.sh run WORKDIR SCRIPT [SECS] -> runs SCRIPT in L1 (one booted by `boot`),
#                                     prints its output, exits with its code
#
# The L1 kernel is Debian bookworm's linux-image-*-cloud-amd64, unmodified,
# from `apt-get download` (no build: a 6.12 build costs minutes on 2 cores, and
# Debian's cloud kernel has kvm/kvm_amd as modules, virtio, ext4, cgroups).
# Its modules are insmodded by a busybox init. Everything the tests need in L1
# is packed into the initramfs (the cloud kernel has no 9p; a share would need
# virtiofsd on the host): one L1 boot serves many tests.
#
# Environment: HUSK_NESTED_DIR (cache, default /var/cache/husk/nested),
# L1_MEM (MiB, default 2048), L1_SMP (default 1, at most 2 on shared hosts),
# L1_KVM_AMD (kvm_amd's parameters in L1, comma-separated; default vgif=0: L2 guests
# never use SVM themselves, and QEMU's emulation of virtual GIF is the youngest part of
# its SVM; whether it has anything to do with L1's rare kernel deaths is open,
# docs/testing.md; set it empty for kvm_amd's defaults).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${HUSK_NESTED_DIR:-/var/cache/husk/nested}
# Modules insmodded in this order (paths under lib/modules/<ver>/kernel).
modules=(virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd drivers/net/tun
    drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev
    drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci fs/fuse/fuse fs/fuse/virtiofs
    fs/overlayfs/overlay)

die() { echo "l1: $*" >&2; exit 1; }

prepare() {
    local pkg ver hash out tmp
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
    [ -n "$pkg" ] || die "no linux-image-cloud-amd64 in apt (apt-get update?)"
    ver=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2}')
    hash=$( { echo "$pkg $ver ${modules[*]}"; cat "$0" "$here/l1-init"; } | sha256sum | cut -c1-16)
    out=$cache/l1-$hash
    if [ -f "$out/vmlinuz" ] && [ -f "$out/base.cpio" ] && [ -d "$out/modroot" ]; then
        echo "$out"
        return
    fi
    command -v busybox >/dev/null || die "busybox missing (apt-get install busybox-static)"
    file -L "$(command -v busybox)" | grep -q static || die "busybox is not static (busybox-static)"
    mkdir -p "$cache"
    tmp=$(mktemp -d "$cache/tmp.XXXXXX")
    trap 'rm -rf "$tmp"' RETURN
    echo "l1: fetching $pkg $ver" >&2
    (cd "$tmp" && chmod 777 . && apt-get download -q "$pkg" >/dev/null 2>&1) \
        || die "apt-get download $pkg failed"
    dpkg -x "$tmp"/*.deb "$tmp/x"
    local kver root=$tmp/root
    kver=$(ls "$tmp/x/lib/modules")
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,l1/modules,husk/bin}
    cp "$(command -v busybox)" "$root/bin/busybox"
    local m i=0
    for m in "${modules[@]}"; do
        i=$((i + 1))
        cp "$tmp/x/lib/modules/$kver/kernel/$m.ko" "$root/l1/modules/$(printf %02d $i)-$(basename "$m").ko"
    done
    install -m 0755 "$here/l1-init" "$root/init"
    (cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet) >"$tmp/base.cpio"
    mkdir -p "$out.tmp"
    cp "$tmp/x/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
    mv "$tmp/base.cpio" "$out.tmp/"
    echo "$kver" >"$out.tmp/version"
    # Every module, depmod'ed, with a static busybox: the root of L1's modprobe (boot-host).
    mkdir -p "$out.tmp/modroot/bin" "$out.tmp/modroot/lib/modules"
    cp "$(command -v busybox)" "$out.tmp/modroot/bin/busybox"
    cp -a "$tmp/x/lib/modules/$kver" "$out.tmp/modroot/lib/modules/"
    busybox depmod -b "$out.tmp/modroot" "$kver"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    # Older L1s go once a day old (a running test may still boot one).
    find "$cache" -maxdepth 1 -name 'l1-*' ! -path "$out" -mmin +1440 -exec rm -rf {} +
    echo "l1: prepared $out ($kver)" >&2
    echo "$out"
}

# Copies each executable to ROOT/husk/bin (debug info stripped) and every
# library ldd lists (and the loader) to the same path under ROOT.
stage() {
    local root=$1 f lib
    shift
    mkdir -p "$root/husk/bin"
    for f in "$@"; do
        [ -x "$f" ] || die "not executable: $f"
        objcopy --strip-debug "$f" "$root/husk/bin/$(basename "$f")" 2>/dev/null \
            || cp "$f" "$root/husk/bin/"
        for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*'); do
            [ -e "$root$lib" ] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
}

testguest() {
    local out=$1 root f lib
    root=$(mktemp -d)
    trap 'rm -rf "$root"' RETURN
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,mnt}
    cp "$(command -v busybox)" "$root/bin/busybox"
    f=$(command -v socat) || die "socat missing (apt-get install socat)"
    cp "$f" "$root/bin/socat"
    for lib in $(ldd "$f" | grep -o '/[^ ]*'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    install -m 0755 "$here/guest-init" "$root/init"
    (cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet) >"$out"
}

# QEMU for side-by-side runs in L1: the binary and its libraries, and the
# firmware it loads (Debian's /usr/share/qemu links into seabios).
stage_qemu() {
    local root=$1 f
    stage "$root" "$(command -v qemu-system-x86_64)"
    mkdir -p "$root/usr/share/qemu" "$root/usr/share/seabios"
    for f in bios-256k.bin bios-microvm.bin qboot.rom kvmvapic.bin linuxboot.bin linuxboot_dma.bin pvh.bin; do
        [ -e "/usr/share/qemu/$f" ] && cp -L "/usr/share/qemu/$f" "$root/usr/share/qemu/"
    done
    for f in bios-256k.bin bios-microvm.bin; do
        [ -e "/usr/share/seabios/$f" ] && cp -L "/usr/share/seabios/$f" "$root/usr/share/seabios/"
    done
    return 0
}

boot() {
    local work=$1 root=$2 dir
    dir=$(prepare)
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (qemu-system-x86)"
    mkdir -p "$work"
    { cat "$dir/base.cpio"; (cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet); } >"$work/initrd.cpio"
    qemu "$work" "$dir" "$work/initrd.cpio" "" -M q35 -m "${L1_MEM:-2048}"
}

# L1 on this host's root: husk-vmm's vhost-user fs server shares / (it exits
# when QEMU disconnects); QEMU's guest RAM is a shared memfd, as vhost-user needs.
boot_host() {
    local work=$1 vmm=$2 dir mem=${L1_MEM:-4096} i
    dir=$(prepare)
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (qemu-system-x86)"
    [ -x "$vmm" ] || die "not executable: $vmm"
    mkdir -p "$work"
    rm -f "$work/fs.sock"
    "$vmm" vhost-user fs --socket "$work/fs.sock" --shared-dir / --tag hostroot \
        >"$work/fs.log" 2>&1 </dev/null &
    for i in $(seq 100); do
        [ -S "$work/fs.sock" ] && break
        sleep 0.1
    done
    [ -S "$work/fs.sock" ] || die "vhost-user fs server did not start: $(cat "$work/fs.log")"
    qemu "$work" "$dir" "$dir/base.cpio" "l1root=host l1mods=$dir/modroot" \
        -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" \
        -M q35,memory-backend=mem -m "$mem" \
        -chardev "socket,id=fs,path=$work/fs.sock" \
        -device vhost-user-fs-pci,chardev=fs,tag=hostroot
}

# QEMU in the foreground (exec: a PR_SET_PDEATHSIG of the caller stays on it).
qemu() {
    local work=$1 dir=$2 initrd=$3 extra=$4 kvm_amd=${L1_KVM_AMD-vgif=0}
    shift 4
    [ -z "$kvm_amd" ] || kvm_amd=l1kvm_amd=$kvm_amd
    rm -f "$work/cmd.sock"
    : >"$work/console.log"
    exec qemu-system-x86_64 -accel tcg -cpu max \
        -smp "${L1_SMP:-1}" \
        -nodefaults -display none -no-reboot \
        -kernel "$dir/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 quiet panic=-1 rdinit=/init $kvm_amd $extra" \
        -serial "file:$work/console.log" \
        -chardev "socket,id=cmd,path=$work/cmd.sock,server=on,wait=off" \
        -serial chardev:cmd "$@"
}

# Manual use: one command over the command socket (needs socat).
run() {
    local work=$1 script=$2 secs=${3:-600} id out rc
    id=$$
    out=$(mktemp)
    # Bounded like socat: an L1 that died never answers. A blank line every 2 s (l1-init
    # skips them) fails once socat is gone with the dead L1's socket, so a caller learns
    # of the death in seconds, not at the end of the command's timeout.
    { printf 'RUN %s %s %s\n' "$id" "$secs" "$(printf '%s' "$script" | base64 -w0)"
      end=$((SECONDS + secs + 10)) n=0
      until grep -q "^@@END $id " "$out" || [ $SECONDS -ge $end ]; do
          sleep 0.2
          n=$((n + 1))
          if [ $((n % 10)) = 0 ]; then printf '\n' 2>/dev/null || break; fi
      done; } \
        | timeout "$((secs + 10))" socat - "UNIX-CONNECT:$work/cmd.sock" >"$out" || true
    sed -n "/^@@BEGIN $id\$/,/^@@END $id /p" "$out" | sed '1d;$d'
    rc=$(sed -n "s/^@@END $id \([0-9]*\)\$/\1/p" "$out")
    rm -f "$out"
    [ -n "$rc" ] || die "no reply from L1"
    exit "$rc"
}

case ${1:-} in
    prepare) prepare ;;
    stage) shift; stage "$@" ;;
    boot) shift; boot "$@" ;;
    boot-host) shift; boot_host "$@" ;;
    testguest) shift; testguest "$@" ;;
    stage-qemu) shift; stage_qemu "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Installs what samepage needs to build and test (Debian 12 packages), then
# configures and builds it in ./build. Safe to run again: it installs only
# what is missing and rebuilds incrementally.
#
# The QEMU guest tests (tests/preload/qemu_guest_test.sh) need QEMU, a static
# busybox and a guest kernel. The guest kernel is Debian's cloud kernel,
# downloaded with apt-get download and extracted (dpkg-deb -x) into
# $SAMEPAGE_GUEST_KERNEL_DIR (default /var/cache/samepage/guest-kernel):
# nothing is installed into the host's /boot.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake pkg-config libxxhash-dev libabsl-dev
          libfmt-dev libcli11-dev libgtest-dev libgmock-dev googletest
          libbenchmark-dev libjemalloc2 libtcmalloc-minimal4 libmimalloc2.0
          libaio1 libpcap-dev
          qemu-system-x86 busybox-static cpio file)
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
updated=""
apt_update() {
  [ -n "$updated" ] || $sudo apt-get update -qq
  updated=1
}

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The concrete package behind linux-image-cloud-amd64, e.g.
# linux-image-6.1.0-56-cloud-amd64.
# Empty (not a failure) where the package lists do not know it yet.
cloud_kernel_package() {
  { apt-cache depends --important linux-image-cloud-amd64 2>/dev/null || true; } |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}'
}

guest_dir=${SAMEPAGE_GUEST_KERNEL_DIR:-/var/cache/samepage/guest-kernel}
if ! ls "$guest_dir"/vmlinuz-* >/dev/null 2>&1; then
  pkg=$(cloud_kernel_package)
  [ -n "$pkg" ] || { apt_update; pkg=$(cloud_kernel_package); }
  tmp=$(mktemp -d)
  chmod 755 "$tmp"  # apt-get download as root hands the file to _apt
  if [ -n "$pkg" ] && (cd "$tmp" && apt-get download -qq "$pkg" 2>/dev/null) &&
     dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/root" &&
     ls "$tmp"/root/boot/vmlinuz-* >/dev/null 2>&1; then
    $sudo mkdir -p "$guest_dir"
    $sudo install -m 0644 "$tmp"/root/boot/vmlinuz-* "$guest_dir"/
    echo "setup: guest kernel $(ls "$guest_dir"/vmlinuz-*)"
  else
    echo "setup: no guest kernel (${pkg:-linux-image-cloud-amd64 not found});" \
         "the QEMU guest tests will be skipped" >&2
  fi
  rm -rf "$tmp"
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSAMEPAGE_GUEST_KERNEL_DIR="$guest_dir" >/dev/null
cmake --build build -j"$(nproc)"

#!/usr/bin/env bash
# A virtual machine monitor under `samepage run`: QEMU (TCG) boots a small
# guest with mem-merge=on; the guest fills 64 MiB with identical pages and
# prints a marker every second. Passes if the guest runs to the end and
# samepage merged its memory. Exit 77 (skipped) without qemu, a static
# busybox or a guest kernel in /boot.
set -u
samepage=$1
qemu=$(command -v qemu-system-x86_64) || { echo "SKIP: no qemu-system-x86_64"; exit 77; }
busybox=$(command -v busybox) || { echo "SKIP: no busybox"; exit 77; }
file -L "$busybox" 2>/dev/null | grep -q "statically linked" ||
  { echo "SKIP: busybox is not static (install busybox-static)"; exit 77; }
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | head -n 1)
[ -n "$kernel" ] && [ -r "$kernel" ] || { echo "SKIP: no guest kernel in /boot"; exit 77; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/tmp"
cp "$busybox" "$work/root/bin/busybox"
cat > "$work/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
yes xxxxxxx | head -c 67108864 > /tmp/fill
for i in $(seq 1 20); do echo "MARKER $i"; sleep 1; done
echo "GUEST DONE"
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip > "$work/initrd.gz")

SAMEPAGE_STAT_FILE="$work/stat" timeout 240 "$samepage" run \
  --set pages_to_scan=10000 --set sleep_millisecs=0 -- \
  "$qemu" -machine pc,mem-merge=on,accel=tcg -m 256 -kernel "$kernel" \
  -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1" \
  -nographic -no-reboot > "$work/console" 2>&1
rc=$?
markers=$(grep -c "MARKER" "$work/console")
peak=$(awk '/^peak_merging_pages/ {print $2}' "$work/stat" 2>/dev/null)
echo "qemu exit $rc, $markers markers, peak_merging_pages ${peak:-none}"
cat "$work/stat" 2>/dev/null
[ "$rc" -eq 0 ] || { tail -20 "$work/console"; exit 1; }
[ "$markers" -eq 20 ] && grep -q "GUEST DONE" "$work/console" || { echo "guest did not run to the end"; exit 1; }
# 64 MiB of identical guest pages: at least 12,000 of its 16,384 pages merged.
[ "${peak:-0}" -ge 12000 ] || { echo "too little merged"; exit 1; }

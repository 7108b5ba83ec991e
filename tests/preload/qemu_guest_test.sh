#!/usr/bin/env bash
# A virtual machine monitor against KSM: QEMU (TCG) boots a small guest with
# mem-merge=on; the guest fills 64 MiB with identical pages and prints a
# marker every second. Passes if the guest runs to the end and at least
# 12,000 of those 16,384 pages merged (peak). QEMU runs under the seccomp
# sandbox libvirt gives it by default (-sandbox on,obsolete=deny,...) where
# it was built with one: samepage must let such a filter in and go on
# merging (until 2026-12-06 there was no such check; a filter that
# refused one of samepage's calls would have killed QEMU).
#
#   qemu_guest_test.sh samepage SAMEPAGE   under `SAMEPAGE run`; the peak is
#                                          the preload's peak_merging_pages
#                                          (SAMEPAGE_STAT_FILE)
#   qemu_guest_test.sh native              against kernel KSM; the peak of
#                                          QEMU's /proc/<pid>/ksm_merging_pages
#                                          (global pages_sharing/pages_shared
#                                          are reported too)
#
# Native runs change global state: every /sys/kernel/mm/ksm knob the test
# writes is saved first and, on every way out, everything is unmerged
# (run=2, bounded wait for pages_shared 0), run=0 and the knobs restored.
# ctest holds the kernel_ksm resource lock around it.
#
# Exit 77 (skipped) without qemu-system-x86_64, a static busybox or a guest
# kernel, or (native) where /sys/kernel/mm/ksm is not writable. The guest
# kernel: $SAMEPAGE_GUEST_KERNEL (a file), else the newest vmlinuz-* in
# $SAMEPAGE_GUEST_KERNEL_DIR (scripts/setup.sh extracts Debian's cloud
# kernel there, default /var/cache/samepage/guest-kernel), else in /boot.
set -u
mode=${1:-}
case "$mode" in
  samepage) samepage=${2:?usage: $0 samepage PATH_TO_SAMEPAGE} ;;
  native) ;;
  *) echo "usage: $0 samepage PATH_TO_SAMEPAGE | native" >&2; exit 2 ;;
esac
ksm=/sys/kernel/mm/ksm
want_merged=12000
guest_seconds=20

qemu=$(command -v qemu-system-x86_64) || { echo "SKIP: no qemu-system-x86_64"; exit 77; }
busybox=$(command -v busybox) || { echo "SKIP: no busybox"; exit 77; }
file -L "$busybox" 2>/dev/null | grep -q "statically linked" ||
  { echo "SKIP: busybox is not static (install busybox-static)"; exit 77; }
kernel=${SAMEPAGE_GUEST_KERNEL:-}
if [ -z "$kernel" ]; then
  for dir in "${SAMEPAGE_GUEST_KERNEL_DIR:-/var/cache/samepage/guest-kernel}" /boot; do
    kernel=$(ls -1 "$dir"/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
    [ -n "$kernel" ] && break
  done
fi
[ -n "$kernel" ] && [ -r "$kernel" ] ||
  { echo "SKIP: no readable guest kernel (run scripts/setup.sh)"; exit 77; }
if [ "$mode" = native ] && ! [ -w "$ksm/run" ]; then
  echo "SKIP: $ksm/run not writable: no kernel KSM control here"; exit 77
fi
echo "guest kernel: $kernel"

work=$(mktemp -d)
qemu_pid=""
sampler_pid=""
saved=()  # "knob=value", in the order written

write_knob() { echo "$2" > "$ksm/$1"; }

# Unmerges everything (bounded), stops ksmd and puts every knob back.
restore_ksm() {
  [ "$mode" = native ] && [ ${#saved[@]} -gt 0 ] || return 0
  write_knob run 2
  local deadline=$((SECONDS + 30))
  while [ "$(cat $ksm/pages_shared)" -ne 0 ] && [ $SECONDS -lt $deadline ]; do
    sleep 0.2
  done
  write_knob run 0
  local kv
  for kv in "${saved[@]}"; do write_knob "${kv%%=*}" "${kv#*=}"; done
  echo "kernel KSM restored: ${saved[*]}, pages_shared $(cat $ksm/pages_shared)"
  saved=()
}

# Ends one of our own children, by pid: TERM, up to 2 s, then KILL. (An
# exited child stays a zombie until waited for: its pid is not reused.)
stop() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 20); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

cleanup() {
  for pid in $sampler_pid $qemu_pid; do stop "$pid"; done
  restore_ksm
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/tmp"
cp "$busybox" "$work/root/bin/busybox"
cat > "$work/root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
yes xxxxxxx | head -c 67108864 > /tmp/fill
for i in \$(seq 1 $guest_seconds); do echo "MARKER \$i"; sleep 1; done
echo "GUEST DONE"
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip > "$work/initrd.gz")

guest=("$qemu" -machine pc,mem-merge=on,accel=tcg -m 256 -kernel "$kernel"
       -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1"
       -nographic -no-reboot)
if "$qemu" -help 2>/dev/null | grep -q -- '^-sandbox'; then
  guest+=(-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny)
  echo "QEMU under its seccomp sandbox"
fi

if [ "$mode" = native ]; then
  for knob in pages_to_scan sleep_millisecs run; do
    saved+=("$knob=$(cat $ksm/$knob)")
  done
  write_knob pages_to_scan 10000
  write_knob sleep_millisecs 0
  write_knob run 1
  "${guest[@]}" > "$work/console" 2>&1 < /dev/null &
  qemu_pid=$!
  # Peaks, every 0.2 s while QEMU runs: its own merged pages, and the
  # global counters (other processes' merges count there too).
  (
    peak_merging=0 peak_sharing=0 peak_shared=0
    while kill -0 "$qemu_pid" 2>/dev/null; do
      m=$(awk '{print $1}' "/proc/$qemu_pid/ksm_merging_pages" 2>/dev/null)
      s=$(cat $ksm/pages_sharing) sh=$(cat $ksm/pages_shared)
      [ "${m:-0}" -gt $peak_merging ] && peak_merging=$m
      [ "$s" -gt $peak_sharing ] && peak_sharing=$s
      [ "$sh" -gt $peak_shared ] && peak_shared=$sh
      printf 'peak_merging_pages %s\npeak_pages_sharing %s\npeak_pages_shared %s\n' \
        $peak_merging $peak_sharing $peak_shared > "$work/stat.tmp"
      mv "$work/stat.tmp" "$work/stat"
      sleep 0.2
    done
  ) &
  sampler_pid=$!
else
  SAMEPAGE_STAT_FILE="$work/stat" "$samepage" run \
    --set pages_to_scan=10000 --set sleep_millisecs=0 -- \
    "${guest[@]}" > "$work/console" 2>&1 < /dev/null &
  qemu_pid=$!  # samepage run execs QEMU in place
fi

# The guest takes ~$guest_seconds s after booting (TCG); bounded at 200 s,
# so that the cleanup (up to 30 s) still ends within ctest's 300 s.
start=$SECONDS
while kill -0 "$qemu_pid" 2>/dev/null && [ $((SECONDS - start)) -lt 200 ]; do
  sleep 0.5
done
if kill -0 "$qemu_pid" 2>/dev/null; then
  echo "QEMU still running after 200 s: killed"
  stop "$qemu_pid"
  qemu_pid=""
  rc=124
else
  wait "$qemu_pid"
  rc=$?
  qemu_pid=""
fi
elapsed=$((SECONDS - start))
if [ -n "$sampler_pid" ]; then
  wait "$sampler_pid" 2>/dev/null
  sampler_pid=""
fi

markers=$(grep -c "MARKER" "$work/console")
peak=$(awk '/^peak_merging_pages/ {print $2}' "$work/stat" 2>/dev/null)
echo "$mode: qemu exit $rc after ${elapsed} s, $markers markers, peak_merging_pages ${peak:-none}"
cat "$work/stat" 2>/dev/null
[ "$rc" -eq 0 ] || { tail -20 "$work/console"; exit 1; }
[ "$markers" -eq "$guest_seconds" ] && grep -q "GUEST DONE" "$work/console" ||
  { echo "guest did not run to the end"; tail -20 "$work/console"; exit 1; }
# 64 MiB of identical guest pages: at least 12,000 of its 16,384 merged.
[ "${peak:-0}" -ge $want_merged ] || { echo "too little merged"; exit 1; }

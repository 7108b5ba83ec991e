"""A Python program that builds duplicated data and asks for merge-any the
kernel's way (prctl through ctypes, knobs through /sys/kernel/mm/ksm), run
natively against kernel KSM and under `samepage run` with the same checks.
Natively it restores every knob it changed and leaves run=0, unmerged.
Exit 77 = skipped."""
import ctypes
import os
import sys
import time

KSM = "/sys/kernel/mm/ksm/"
PR_SET_MEMORY_MERGE = 67
BLOBS, MIB = 64, 1 << 20


def read(name):
    with open(KSM + name) as f:
        return f.read().strip()


def write(name, value):
    with open(KSM + name, "w") as f:
        f.write(value)


def ksm_stat():
    out = {}
    with open("/proc/self/ksm_stat") as f:
        for line in f:
            key, value = line.rsplit(None, 1)
            out[key.rstrip(":")] = value
    return out


def main():
    try:
        saved = {k: read(k) for k in ("run", "pages_to_scan", "sleep_millisecs")}
        write("pages_to_scan", saved["pages_to_scan"])
    except OSError as e:
        print(f"SKIP: /sys/kernel/mm/ksm not writable here ({e})")
        return 77
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        print(f"SKIP: prctl(PR_SET_MEMORY_MERGE): {os.strerror(ctypes.get_errno())}")
        return 77
    try:
        # Built one by one: 64 separate copies of the same 1 MiB.
        blobs = [bytes(bytearray(b"x" * MIB)) for _ in range(BLOBS)]
        write("pages_to_scan", "20000")
        write("sleep_millisecs", "0")
        write("run", "1")
        want = BLOBS * MIB // 4096 * 9 // 10  # 90% of the blobs' pages
        start, merging = time.time(), 0
        while time.time() - start < 30:
            merging = int(ksm_stat()["ksm_merging_pages"])
            if merging >= want:
                break
            time.sleep(0.05)
        took = time.time() - start
        stat = ksm_stat()
        print(f"ksm_merging_pages {merging} (want >= {want}) after {took:.2f} s; "
              f"ksm_process_profit {stat['ksm_process_profit']}; "
              f"merge_any {stat['ksm_merge_any']}")
        ok = merging >= want and stat["ksm_merge_any"] == "yes"
        ok = ok and all(b == blobs[0] for b in blobs) and len(blobs[5]) == MIB
        return 0 if ok else 1
    finally:
        libc.prctl(PR_SET_MEMORY_MERGE, 0, 0, 0, 0)
        write("run", "2")
        write("run", "0")
        for k in ("pages_to_scan", "sleep_millisecs"):
            write(k, saved[k])
        write("run", saved["run"] if saved["run"] in ("0", "1") else "0")


if __name__ == "__main__":
    sys.exit(main())

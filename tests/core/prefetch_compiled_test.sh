#!/bin/sh
# The scanner's look-ahead (Ksm::PrefetchLookups) must compile to prefetch
# instructions: GCC once deleted the calls into abseil's prefetch() as
# having no effect, and the function was a bare return (see ksm.cc).
# usage: prefetch_compiled_test.sh LIBRARY
set -eu
lib=$1
body=$(objdump -d --no-show-raw-insn -C "$lib" |
  awk '/^[0-9a-f]+ <samepage::Ksm::PrefetchLookups\(samepage::Ksm::Item const&\) const>:/ {p = 1; next}
       p && /^$/ {exit}
       p {print}')
if [ -z "$body" ]; then
  echo "Ksm::PrefetchLookups not found in $lib" >&2
  exit 1
fi
n=$(printf '%s\n' "$body" | grep -c 'prefetch' || true)
echo "Ksm::PrefetchLookups: $n prefetch instructions"
if [ "$n" -lt 2 ]; then
  printf '%s\n' "$body" >&2
  echo "FAIL: the index look-ahead prefetches nothing" >&2
  exit 1
fi

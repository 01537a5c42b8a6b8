#!/bin/bash
# What a CPU-bound neighbour costs a process that waits for fdatasync, as
# Postgres writers wait for every commit: 8 KB written and fdatasync'd in a
# loop for 3 s, alone and beside two busy loops (nice 19; SCHED_IDLE in this
# session; SCHED_IDLE in a session of their own, i.e. another autogroup).
# Prints the time per fdatasync and how much of it was spent runnable but
# waiting for a CPU (/proc/self/schedstat). Needs python3 and util-linux.
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"; kill $(jobs -p) 2>/dev/null || true' EXIT
probe() {
    python3 - "$dir/f" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
block = b"x" * 8192
def sched():
    return [int(x) for x in open("/proc/self/schedstat").read().split()]
s0, n, t0 = sched(), 0, time.time()
while time.time() - t0 < 3:
    os.pwrite(fd, block, 0)
    os.fdatasync(fd)
    n += 1
s1 = sched()
print(f"{3000 / n:7.3f} ms per fdatasync, {(s1[1] - s0[1]) / n / 1e6:7.3f} ms of it waiting for a CPU")
PY
}
loops() { # $@: how to start each loop
    for _ in 1 2; do "$@" sh -c 'while :; do :; done' & done
    sleep 0.3
}
stop_loops() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }
uname -r
grep -o 'Dynamic Preempt: [a-z]*' <(dmesg 2>/dev/null) || true
printf '%-44s' "alone:"; probe
loops nice -n 19; printf '%-44s' "beside 2 busy loops, nice 19:"; probe; stop_loops
loops chrt -i 0; printf '%-44s' "beside 2 busy loops, SCHED_IDLE:"; probe; stop_loops
loops setsid chrt -i 0; printf '%-44s' "beside 2 SCHED_IDLE loops, another session:"; probe
pkill -f "^sh -c while :; do :; done" 2>/dev/null || true

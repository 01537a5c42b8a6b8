#!/bin/bash
# What a CPU-bound neighbour costs a process that waits for fdatasync, as
# Postgres writers wait at every commit: 8 KB written and fdatasync'd in a
# loop for 3 s, alone and beside two busy loops (nice 19 and SCHED_IDLE in
# this session; nice 19 and SCHED_IDLE each in a session of their own, i.e.
# another autogroup, as Postgres and the processes around it usually are).
# Prints the time per fdatasync and how much of it was spent runnable but
# waiting for a CPU (/proc/self/schedstat). Needs python3 and util-linux.
#
#   bash scripts/fsync-wakeup.sh [DIR]   # DIR: on the disk that matters (not tmpfs); default .
set -eu
dir=$(mktemp -d -p "${1:-.}")
pids=()
stop_loops() {
    if [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    pids=()
}
trap 'stop_loops; rm -rf "$dir"' EXIT
probe() {
    python3 - "$dir/f" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
block = b"x" * 8192
def sched():
    return [int(x) for x in open("/proc/self/schedstat").read().split()]
s0, n, t0 = sched(), 0, time.monotonic()
while time.monotonic() - t0 < 3:
    os.pwrite(fd, block, 0)
    os.fdatasync(fd)
    n += 1
elapsed, s1 = time.monotonic() - t0, sched()
print(f"{elapsed * 1000 / n:7.3f} ms per fdatasync, {(s1[1] - s0[1]) / n / 1e6:7.3f} ms of it waiting for a CPU")
PY
}
loops() { # $@: how to start each loop
    for _ in 1 2; do
        "$@" sh -c 'while :; do :; done' &
        pids+=($!)
    done
    sleep 0.3
}
case_() { # $1: label, then how to start each loop (nothing: alone)
    local label=$1
    shift
    [ $# -gt 0 ] && loops "$@"
    printf '%-46s' "$label:"
    probe
    stop_loops
}
echo "kernel $(uname -r); $(dmesg 2>/dev/null | grep -o 'Dynamic Preempt: [a-z]*' || echo 'preemption model: unknown');" \
    "$( (zcat /proc/config.gz 2>/dev/null || cat "/boot/config-$(uname -r)" 2>/dev/null) | grep -o '^CONFIG_HZ=[0-9]*' || echo 'CONFIG_HZ unknown');" \
    "sched_autogroup_enabled $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo unknown)"
case_ "alone"
case_ "beside 2 busy loops, nice 19" nice -n 19
case_ "beside 2 busy loops, SCHED_IDLE" chrt -i 0
case_ "beside 2 nice 19 loops, another session" setsid nice -n 19
case_ "beside 2 SCHED_IDLE loops, another session" setsid chrt -i 0

#!/usr/bin/env bash
# Runs inside a virtme-ng guest (kernels/matrix.py starts it): prepares the guest the way a
# node is prepared (tracefs, cgroup v2 controllers, loop devices, loopback), then runs the
# command from the repository and leaves its output and exit status in OUTDIR, which the
# host reads (vng's own exit status says nothing about the guest's command).
#   kernels/guest.sh OUTDIR REPO COMMAND...
out=$1 repo=$2
shift 2
exec >"$out/guest.log" 2>&1
echo "guest: $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
[ -d /sys/kernel/tracing/events ] || mount -t tracefs tracefs /sys/kernel/tracing
# vng mounts a bare cgroup2 at /sys/fs/cgroup: enable the controllers a node's runtime would.
if [ -e /sys/fs/cgroup/cgroup.subtree_control ]; then
    for controller in cpu memory io pids; do
        echo "+$controller" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || echo "guest: no $controller controller"
    done
fi
modprobe loop 2>/dev/null || true
# /dev/net/tun, which a node's udev creates from the modules' static nodes (no udev runs here).
modprobe tun 2>/dev/null || true
[ -e /dev/net/tun ] || { mkdir -p /dev/net && mknod -m 600 /dev/net/tun c 10 200; }
ip link set lo up
cd "$repo" || exit 1
"$@"
echo $? >"$out/status"

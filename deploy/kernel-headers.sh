#!/bin/sh
# Tapio's own kernel headers: Debian's linux-headers-<version>-amd64 and its -common half merged
# into the one tree bcc takes (BCC_KERNEL_SOURCE names a single directory), as symbolic links.
# Any recent headers serve every node: struct offsets come from BTF, never from these.
#   deploy/kernel-headers.sh DEST        (make setup: .venv/share/tapio/kernel-headers)
set -eu
dest=$1
arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
if [ -z "$arch" ]; then
    echo "kernel-headers: no /usr/src/linux-headers-*-amd64 (apt-get install linux-headers-amd64)" >&2
    exit 1
fi
common=${arch%-amd64}-common
if [ -f "$dest/.from" ] && [ "$(cat "$dest/.from")" = "$arch" ]; then
    exit 0  # already built from these headers
fi
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
cp -rs "$common/." "$dest.tmp/"
cp -rs --remove-destination "$arch/." "$dest.tmp/"
echo "$arch" > "$dest.tmp/.from"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "kernel-headers: $dest from $(basename "$arch") and $(basename "$common")"

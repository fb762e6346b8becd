#!/usr/bin/env bash
# Builds the agent image with podman, on a Debian base made here with debootstrap (no container
# registry is reachable from this machine; elsewhere `podman build -f deploy/Dockerfile .` uses
# the public Debian image, the Dockerfile's default BASE).
#   deploy/build-image.sh [TAG]        TAG defaults to localhost/tapio-agent:dev
# The base is built once per Debian suite and kept (TAPIO_IMAGE_CACHE, ~/.cache/tapio/image).
set -euo pipefail

suite=${TAPIO_IMAGE_SUITE:-bookworm}
mirror=${TAPIO_IMAGE_MIRROR:-http://deb.debian.org/debian}
cache=${TAPIO_IMAGE_CACHE:-$HOME/.cache/tapio/image}
tag=${1:-localhost/tapio-agent:dev}
base=localhost/tapio-base:$suite
repo=$(cd "$(dirname "$0")/.." && pwd)

if ! podman image exists "$base"; then
    archive=$cache/debian-$suite.tar
    if [ ! -f "$archive" ]; then
        mkdir -p "$cache"
        rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
        trap 'rm -rf "$rootfs"' EXIT
        echo "build-image: debootstrap $suite (minbase) from $mirror"
        debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
            || { tail -20 "$cache/debootstrap.log"; exit 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" --numeric-owner -cf "$archive.part" .
        rm -rf "$rootfs"
        mv "$archive.part" "$archive"
    fi
    podman import --quiet "$archive" "$base" >/dev/null
fi
# Host networking for apt and pip inside the build: no bridge or NAT is set up on this machine;
# runc, not crun: crun refuses a host whose cgroups are mixed v1 and v2 (this one's are).
# pip inside the build trusts what this machine's pip trusts (its HTTPS may pass a proxy with its own CA).
ca=$(pip3 config get global.cert 2>/dev/null || true)
ca=${ca:-/etc/ssl/certs/ca-certificates.crt}
podman --runtime=runc build --quiet --network=host --build-arg BASE="$base" \
    --volume "$ca:/etc/tapio-build-ca.crt:ro" --build-arg PIP_CERT=/etc/tapio-build-ca.crt \
    -t "$tag" -f "$repo/deploy/Dockerfile" "$repo"

#!/usr/bin/env bash
# Fetch Debian's own kernel packages for the test matrix and unpack them into a cache
# (never into /boot or /lib/modules): kernels/fetch.sh [CACHE]
#
# Each line of kernels/kernels.txt names a Debian suite and the kernel ABI its metapackage
# points to today is looked up, so the cache holds the suite's current build. Suites the
# host's own sources lack are reached through a temporary file under
# /etc/apt/sources.list.d/, removed again whatever happens.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-${TAPIO_KERNEL_CACHE:-$HOME/.cache/tapio/kernels}}
mkdir -p "$cache"
archive=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
archive=${archive:-http://deb.debian.org/debian}
extra=/etc/apt/sources.list.d/tapio-kernel-matrix.list

cleanup() {
    if [ -e "$extra" ]; then rm -f "$extra"; apt-get update -qq || true; fi
}
trap cleanup EXIT

wanted=()
while read -r name suite; do
    case "$name" in ''|'#'*) continue ;; esac
    if [ -e "$cache/$name/vmlinuz" ]; then continue; fi
    wanted+=("$name $suite")
done < "$here/kernels.txt"
[ ${#wanted[@]} -gt 0 ] || exit 0

known=$(sed -n 's/^Suites: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | tr ' ' '\n')
for entry in "${wanted[@]}"; do
    suite=${entry#* }
    grep -qx "$suite" <<<"$known" || echo "deb $archive $suite main" >> "$extra"
done
apt-get update -qq

for entry in "${wanted[@]}"; do
    name=${entry%% *}; suite=${entry#* }
    # The metapackage of that suite names the current ABI, e.g. linux-image-6.1.0-41-amd64.
    package=$(apt-cache depends "linux-image-amd64/$suite" 2>/dev/null |
              sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
    if [ -z "$package" ]; then echo "fetch: no linux-image-amd64 in $suite" >&2; exit 1; fi
    work=$(mktemp -d)
    chown _apt "$work" 2>/dev/null || true  # apt downloads as its own sandbox user
    (cd "$work" && apt-get download -qq "$package/$suite")
    rm -rf "$cache/$name.tmp"
    dpkg-deb -x "$work"/*.deb "$cache/$name.tmp"
    rm -rf "$work"
    # trixie's packages put the modules under usr/lib (merged /usr); vng looks in lib/.
    if [ ! -d "$cache/$name.tmp/lib/modules" ]; then ln -s usr/lib "$cache/$name.tmp/lib"; fi
    release=$(ls "$cache/$name.tmp/lib/modules")
    ln -s "boot/vmlinuz-$release" "$cache/$name.tmp/vmlinuz"
    echo "$release" > "$cache/$name.tmp/release"
    rm -rf "$cache/$name"
    mv "$cache/$name.tmp" "$cache/$name"
    echo "fetched $package ($release) into $cache/$name"
done

#!/usr/bin/env bash
# Build a Debian bookworm base image with Python 3.11 from Debian's packages (debootstrap + docker import),
# for machines that can reach Debian's archive but no image registry. Elsewhere keep BASE=python:3.11-slim.
#
#   deploy/base-image.sh [IMAGE]        default IMAGE: tiergate-base:bookworm
#   DEBIAN_MIRROR=URL  the archive to bootstrap from (default: the first URI of this host's apt sources)
#
# Bookworm's python3 is 3.11 (pyproject wants >=3.11,<3.12). minbase keeps it small: the Dockerfile's builder
# stage adds the compilers with apt-get, exactly as it does on python:3.11-slim.
set -euo pipefail

IMAGE=${1:-tiergate-base:bookworm}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates

mirror_from_host() {
    # The host's own apt sources: a mirror this machine can already reach (deb822 first, then one-line format).
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)
    echo "$uri"
}

MIRROR=${DEBIAN_MIRROR:-$(mirror_from_host)}
[ -n "$MIRROR" ] || { echo "no Debian mirror found: set DEBIAN_MIRROR" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

ROOT=$(mktemp -d /var/tmp/tiergate-base.XXXXXX)
chmod 755 "$ROOT"   # mktemp makes it 0700: as the image's /, it would lock every non-root user out
trap 'rm -rf "$ROOT"' EXIT
START=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >/dev/null
# The image's apt must reach the same archive (the builder stage installs compilers); no caches, no docs.
printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" >"$ROOT/etc/apt/sources.list"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*
# An imported image has no environment at all: PATH as every Debian image sets it.
tar -C "$ROOT" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
echo "base image $IMAGE: $(( $(date +%s) - START )) s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

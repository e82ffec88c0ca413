#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# rclone.sh: build rclone (whose `serve s3` is the S3 server of the closure tests) from the Go
# module proxy, cached outside the repo, and print the binary's path. Debian's rclone 1.60 has
# no `serve s3` that the AWS SDK's SigV4 requests pass.
#
#   NIXOS_NSPAWN_CACHE   cache root (default /var/cache/nomad-driver-nixos)
set -euo pipefail

RCLONE_VERSION=v1.76.0

CACHE_DIR=${NIXOS_NSPAWN_CACHE:-/var/cache/nomad-driver-nixos}
OUT_DIR=$CACHE_DIR/tools
BIN=$OUT_DIR/rclone-$RCLONE_VERSION

log() { echo "rclone-build: $*" >&2; }
die() { log "error: $*"; exit 1; }

# A build from the module (not a release) calls itself vX.Y.Z-DEV.
is_built() {
	local out
	[[ -x $BIN ]] && out=$("$BIN" version 2>/dev/null) && [[ ${out%%$'\n'*} == "rclone $RCLONE_VERSION"* ]]
}

if is_built; then
	echo "$BIN"
	exit 0
fi

command -v go >/dev/null || die "go is not in PATH"
mkdir -p "$OUT_DIR"
# Parallel callers must not build twice into one place.
exec {lock_fd}>"$OUT_DIR/.rclone.lock"
flock "$lock_fd"
if is_built; then
	echo "$BIN"
	exit 0
fi

work=$(mktemp -d "$OUT_DIR/.rclone.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building github.com/rclone/rclone@$RCLONE_VERSION (several minutes of CPU, once)"
start=$SECONDS
# GOBIN outside any module: the project's go.mod plays no part. -p 1 leaves a core to others.
(cd "$work" && CGO_ENABLED=0 GOBIN="$work" GOFLAGS=-mod=mod go install -p 1 -trimpath -ldflags '-s -w' \
	"github.com/rclone/rclone@$RCLONE_VERSION") || die "go install failed"
log "built in $((SECONDS - start))s"
mv -f "$work/rclone" "$BIN"
is_built || die "$BIN does not report rclone $RCLONE_VERSION"
echo "$BIN"

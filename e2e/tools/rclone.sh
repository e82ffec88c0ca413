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

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOG_TAG=rclone-build
# shellcheck source-path=SCRIPTDIR source=../lib/host.sh
. "$REPO_ROOT/e2e/lib/host.sh"

RCLONE_VERSION=v1.76.0
CACHE_DIR=${NIXOS_NSPAWN_CACHE:-/var/cache/nomad-driver-nixos}
DIR=$CACHE_DIR/tools/rclone-$RCLONE_VERSION.d

build_rclone() {
	local out=$1 start=$SECONDS
	mkdir -p "$out"
	log "building github.com/rclone/rclone@$RCLONE_VERSION (several minutes of CPU, once)"
	# GOBIN outside any module: the project's go.mod plays no part. -p 1 leaves a core to others.
	(cd "$out" && CGO_ENABLED=0 GOBIN="$out" GOFLAGS=-mod=mod go install -p 1 -trimpath -ldflags '-s -w' \
		"github.com/rclone/rclone@$RCLONE_VERSION") || return 1
	log "built in $((SECONDS - start))s"
	# A build from the module (not a release) calls itself vX.Y.Z-DEV.
	[[ $("$out/rclone" version 2>/dev/null | head -n1) == "rclone $RCLONE_VERSION"* ]]
}

command -v go >/dev/null || die "go is not in PATH"
cached_build "$DIR" .version "$RCLONE_VERSION" build_rclone
echo "$DIR/rclone"

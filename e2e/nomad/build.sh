#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# build.sh: build the real Nomad agent (with the web UI) from the Go module
# source, cached, and print the binary's path. The e2e agent (e2e/agent)
# runs it. Only the Go module proxy is needed: no release download, no Node.
#
#   NIXOS_NSPAWN_CACHE   cache root (default /var/cache/nomad-driver-nixos)
set -euo pipefail

NOMAD_VERSION=1.11.3
# The tagged module's go.mod replaces .../nomad/api with ./api, which a module
# download does not carry; this pseudo-version is the api module the proxy serves.
NOMAD_API_VERSION=v0.0.0-20260907080526-08ef8f3d26da

CACHE_DIR=${NIXOS_NSPAWN_CACHE:-/var/cache/nomad-driver-nixos}
OUT_DIR=$CACHE_DIR/nomad-$NOMAD_VERSION
BIN=$OUT_DIR/nomad

log() { echo "nomad-build: $*" >&2; }
die() { log "error: $*"; exit 1; }

# First line of `nomad version` (captured, not piped into head: pipefail and SIGPIPE).
version_of() {
	local out
	out=$("$1" version 2>/dev/null) || return 1
	echo "${out%%$'\n'*}"
}

is_built() {
	[[ -x $BIN && $(version_of "$BIN") == "Nomad v$NOMAD_VERSION" ]]
}

if is_built; then
	echo "$BIN"
	exit 0
fi

command -v go >/dev/null || die "go is not in PATH"
mkdir -p "$OUT_DIR"
# Parallel callers (CI and a developer) must not build twice into one place.
exec {lock_fd}>"$OUT_DIR/.build.lock"
flock "$lock_fd"
if is_built; then
	echo "$BIN"
	exit 0
fi

work=$(mktemp -d "$OUT_DIR/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading github.com/hashicorp/nomad@v$NOMAD_VERSION"
# Run outside any module so the project's go.mod plays no part.
moddir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "github.com/hashicorp/nomad@v$NOMAD_VERSION" |
	sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
[[ -n $moddir && -f $moddir/go.mod ]] || die "go mod download gave no module directory"
# The module cache is read-only; go mod edit needs a writable copy.
cp -r "$moddir" "$work/src"
chmod -R u+w "$work/src"

cd "$work/src"
go mod edit -dropreplace=github.com/hashicorp/nomad/api
go mod edit -require="github.com/hashicorp/nomad/api@$NOMAD_API_VERSION"
# -tags ui compiles in the pre-built web UI (command/agent/bindata_assetfs.go).
log "building nomad v$NOMAD_VERSION with the web UI (several minutes of CPU)"
start=$SECONDS
GOFLAGS=-mod=mod go build -tags ui -trimpath -o "$work/nomad" . ||
	die "go build -tags ui failed"
log "built in $((SECONDS - start))s"

got=$(version_of "$work/nomad") || true
[[ $got == "Nomad v$NOMAD_VERSION" ]] || die "built binary reports '$got', want Nomad v$NOMAD_VERSION"
# $work is in $OUT_DIR, so the rename is atomic: a cached binary is always complete.
mv -f "$work/nomad" "$BIN"
echo "$BIN"

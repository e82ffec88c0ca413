#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# demo.sh up|down: from nothing to a NixOS-style machine running under a real Nomad agent.
# `make demo` and `make demo-stop` call it. On a host without systemd as PID 1 everything runs in
# the systemd test host (e2e/testhost); the Nomad agent and the machines run there.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${NIXOS_NSPAWN_CACHE:-/var/cache/nomad-driver-nixos}
export NOMAD_ADDR=${NOMAD_ADDR:-http://127.0.0.1:4646}
JOB=nixos-demo
# DEMO_ON_HOST=1: this host runs systemd and a Nomad agent with the plugin installed already;
# use them (and the nomad CLI in PATH) instead of the test host and an agent of our own.
ON_HOST=${DEMO_ON_HOST:-}
if [[ -n $ON_HOST ]]; then
	NOMAD=$(command -v nomad) || { echo "DEMO_ON_HOST needs nomad in PATH" >&2; exit 1; }
	[[ -d /run/systemd/system ]] || { echo "DEMO_ON_HOST needs systemd as PID 1" >&2; exit 1; }
	inhost() { "$@"; }
else
	NOMAD=$REPO/build/nomad
	inhost() { "$REPO/e2e/testhost/testhost.sh" exec "$@"; }
fi

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

up() {
	# DEMO_TOPLEVEL: a demo closure built before (on a host without Nix, say).
	if [[ -n ${DEMO_TOPLEVEL:-} ]]; then
		NIXOS_NSPAWN_SYSTEMD_TOPLEVEL=$DEMO_TOPLEVEL
	else
		say "Building the demo closure offline"
		"$REPO/e2e/fixtures/build.sh" >/dev/null
		# shellcheck disable=SC1091 # written by build.sh
		. "$CACHE/fixtures.env"
	fi
	if [[ -z $ON_HOST ]]; then
		say "Building the plugin and Nomad v1.11.3 (cached after the first run), booting the systemd test host, starting an agent"
		make -C "$REPO" --no-print-directory build
		"$REPO/e2e/testhost/testhost.sh" up
		"$REPO/e2e/nomad/build.sh" >/dev/null
		"$REPO/e2e/agent/agent.sh" up
	fi

	say "Running the job: a Debian systemd booted from /nix/store paths, with a web service"
	local jobfile
	jobfile=$(mktemp --suffix=.nomad.hcl)
	sed "s|@toplevel@|$NIXOS_NSPAWN_SYSTEMD_TOPLEVEL|" "$REPO/e2e/demo.nomad.hcl" >"$jobfile"
	cat "$jobfile"
	"$NOMAD" job run "$jobfile"
	rm -f "$jobfile"

	local alloc=""
	for _ in $(seq 120); do
		alloc=$("$NOMAD" job allocs -t '{{range .}}{{if eq .ClientStatus "running"}}{{.ID}}{{end}}{{end}}' "$JOB" 2>/dev/null || true)
		[[ -n $alloc ]] && break
		sleep 1
	done
	[[ -n $alloc ]] || { "$NOMAD" job status "$JOB"; echo "the allocation did not start" >&2; exit 1; }
	# Wait for the guest's web service, then give the stats a few samples.
	for _ in $(seq 60); do
		"$NOMAD" alloc exec -i=false -t=false -task web "$alloc" /usr/bin/test -s /run/www/index.html 2>/dev/null && break
		sleep 1
	done
	sleep 3

	say "nomad alloc status -stats $alloc"
	"$NOMAD" alloc status -stats "$alloc"
	say "nomad alloc logs $alloc web   (the machine's console, last lines)"
	"$NOMAD" alloc logs "$alloc" web | tail -n 15
	local addr port
	addr=$("$NOMAD" service info -t '{{range .}}{{.Address}}:{{.Port}}{{end}}' nixos-demo-web)
	say "The guest's web service answers on the machine's address, as Nomad registered it: $addr"
	http_get "${addr%:*}" "${addr##*:}"
	port=$("$NOMAD" alloc status -t '{{range .AllocatedResources.Shared.Ports}}{{.Value}}{{end}}' "$alloc")
	say "... and on the host's port $port (the group's \"http\" port, forwarded by the driver): 127.0.0.1:$port"
	http_get 127.0.0.1 "$port"
	say "On the host: machinectl list"
	inhost machinectl list

	cat <<-EOF

		Look further (NOMAD_ADDR=$NOMAD_ADDR):
		  $NOMAD alloc status $alloc
		  $NOMAD alloc logs -f $alloc web
		  $NOMAD alloc exec -task web $alloc /bin/sh
		  $([[ -z $ON_HOST ]] && echo "$REPO/e2e/testhost/testhost.sh exec ")machinectl list
		  $([[ -z $ON_HOST ]] && echo "$REPO/e2e/testhost/testhost.sh exec ")systemctl -M nomad-${alloc:0:8}-web list-units
		  Nomad UI: $NOMAD_ADDR/ui/allocations/$alloc
		Tear it all down with: make demo-stop
	EOF
}

# http_get HOST PORT prints the body of GET / (bash's /dev/tcp: no curl needed). The build
# machine shares the test host's network, so the machine's address is reachable from here.
http_get() {
	local fd
	exec {fd}<>"/dev/tcp/$1/$2"
	printf 'GET / HTTP/1.0\r\nHost: %s\r\n\r\n' "$1" >&"$fd"
	sed '1,/^\r$/d' <&"$fd"
	exec {fd}>&-
}

down() {
	"$NOMAD" job stop -purge "$JOB" >/dev/null 2>&1 || true
	if [[ -z $ON_HOST ]]; then
		"$REPO/e2e/agent/agent.sh" down || true
		"$REPO/e2e/testhost/testhost.sh" down
	fi
}

case ${1:-} in
up) up ;;
down) down ;;
*)
	echo "usage: $0 up|down" >&2
	exit 2
	;;
esac

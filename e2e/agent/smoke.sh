#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# smoke.sh: run the jobs in e2e/agent/jobs through the real agent with the
# nomad CLI, as a user would, and check what Nomad reports. Needs
# `e2e/agent/agent.sh up` and the fixtures (e2e/fixtures/build.sh).
#
#   batch:   tiny fixture prints hello-from-nomad and exits 0
#            -> alloc complete, exit code 0, the line in `nomad alloc logs`
#   service: systemd fixture -> alloc running, memory in the stats,
#            `nomad alloc exec` reaches the guest's systemd, machinectl shows
#            the machine, a job stop ends it with exit code 0
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
TESTHOST=$REPO_ROOT/e2e/testhost/testhost.sh
JOBS=$SCRIPT_DIR/jobs
FIXTURES_ENV=${NIXOS_NSPAWN_CACHE:-/var/cache/nomad-driver-nixos}/fixtures.env
export NOMAD_ADDR=${NOMAD_ADDR:-http://127.0.0.1:4646}
# No "View this job in the Web UI" hints in the output.
export NOMAD_CLI_SHOW_HINTS=false

log() { echo "smoke: $*" >&2; }
fail() {
	log "FAIL: $*"
	exit 1
}

nomad() { "$REPO_ROOT/build/nomad" "$@"; }

# The only allocation of job $1.
alloc_of() {
	local ids
	ids=$(nomad job allocs -t '{{range .}}{{.ID}}{{"\n"}}{{end}}' "$1")
	echo "${ids%%$'\n'*}"
}

# Wait until allocation $1's client status is $2 (seconds: $3).
wait_client_status() {
	local alloc=$1 want=$2 deadline=$((SECONDS + $3)) got=""
	while ((SECONDS < deadline)); do
		got=$(nomad alloc status -t '{{.ClientStatus}}' "$alloc")
		[[ $got == "$want" ]] && return 0
		case $got in complete | failed | lost) break ;; esac
		sleep 0.5
	done
	nomad alloc status "$alloc" >&2 || true
	fail "allocation $alloc is '$got', want '$want'"
}

# "<state> exit=<code of the Terminated event>" of task $2 in allocation $1.
task_result() {
	nomad alloc status -t "{{with index .TaskStates \"$2\"}}{{.State}} failed={{.Failed}}{{range .Events}}{{if eq .Type \"Terminated\"}} exit={{.ExitCode}}{{end}}{{end}}{{end}}" "$1"
}

machine_listed() {
	local list
	list=$("$TESTHOST" exec machinectl list --no-legend)
	grep -q "^$1 " <<<"$list"
}

[[ -f $FIXTURES_ENV ]] || fail "$FIXTURES_ENV is missing (run e2e/fixtures/build.sh)"
set -a
# shellcheck source=/dev/null
. "$FIXTURES_ENV"
set +a
"$SCRIPT_DIR/agent.sh" status >/dev/null || fail "the agent is not up (run e2e/agent/agent.sh up)"

# An earlier run's job would make `job run` a no-op and leave its old allocation.
for job in e2e-tiny-batch e2e-systemd-service; do
	nomad job stop -purge -yes "$job" >/dev/null 2>&1 || true
done

log "batch job: tiny fixture"
nomad job run -var "toplevel=$NIXOS_NSPAWN_TINY_TOPLEVEL" "$JOBS/tiny-batch.nomad.hcl" >/dev/null
alloc=$(alloc_of e2e-tiny-batch)
wait_client_status "$alloc" complete 60
result=$(task_result "$alloc" hello)
[[ $result == "dead failed=false exit=0" ]] || fail "batch task: $result"
logs=$(nomad alloc logs "$alloc" hello)
grep -qx 'hello-from-nomad' <<<"$logs" || fail "no hello-from-nomad in the logs:"$'\n'"$logs"
log "ok: $alloc complete, $result, logs have hello-from-nomad"
nomad job stop -purge -yes e2e-tiny-batch >/dev/null

log "service job: systemd fixture"
# job run waits for the deployment to be healthy.
nomad job run -var "toplevel=$NIXOS_NSPAWN_SYSTEMD_TOPLEVEL" "$JOBS/systemd-service.nomad.hcl" >/dev/null
alloc=$(alloc_of e2e-systemd-service)
wait_client_status "$alloc" running 60
machine=nomad-${alloc:0:8}-guest

# The first sample comes at once, but give the stats hook a collection interval.
usage=0
for _ in $(seq 20); do
	stats=$(nomad operator api "/v1/client/allocation/$alloc/stats")
	[[ $stats =~ \"Usage\":([0-9]+) ]] && usage=${BASH_REMATCH[1]}
	((${usage:-0} > 0)) && break
	sleep 0.5
done
((${usage:-0} > 0)) || fail "no memory usage in the allocation's stats"
# Captured first: grep -q exits at the first match and would SIGPIPE nomad.
out=$(nomad alloc status -stats "$alloc")
grep -q '^Memory Stats' <<<"$out" || fail "alloc status -stats shows no memory stats:"$'\n'"$out"
log "ok: $alloc running, memory usage $usage bytes"

comm=$(nomad alloc exec -task guest "$alloc" /bin/cat /proc/1/comm)
[[ $comm == systemd ]] || fail "alloc exec: PID 1 is '$comm', want systemd"
log "ok: alloc exec sees systemd as PID 1"

machine_listed "$machine" ||
	fail "machinectl list does not show $machine"
log "ok: machinectl lists $machine"

# Stop without purging first, so the allocation (and its exit code) can still be read.
nomad job stop -yes e2e-systemd-service >/dev/null
wait_client_status "$alloc" complete 60
result=$(task_result "$alloc" guest)
[[ $result == "dead failed=false exit=0" ]] || fail "service task after stop: $result"
for _ in $(seq 60); do
	machine_listed "$machine" || break
	sleep 0.5
done
machine_listed "$machine" && fail "$machine still runs after the stop"
nomad job stop -purge -yes e2e-systemd-service >/dev/null
log "ok: job stop ended $alloc with $result, machine gone"
log "PASS"

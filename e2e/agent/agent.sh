#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# agent.sh: a real Nomad agent (-dev: server and client in one) with this
# checkout's plugin, running inside the systemd test host (e2e/testhost).
# The test host shares the build machine's network, so the HTTP API and the
# web UI answer on http://127.0.0.1:4646 and build/nomad works from outside:
#   NOMAD_ADDR=http://127.0.0.1:4646 build/nomad job run ...
#
#   agent.sh up      (re)start the agent with a fresh data dir; waits until the
#                    node is ready and the nixos-nspawn driver is healthy
#   agent.sh down    purge every job, wait for their machines to go, stop the
#                    agent and remove its data; idempotent
#   agent.sh status  exit 0 if the agent answers and the driver is healthy
#   agent.sh logs [JOURNALCTL ARGS...]   the agent's journal
#
# Needs `make build` (build/nomad-driver-nixos); e2e/nomad/build.sh supplies
# the Nomad binary (cached; the first build takes several minutes).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
CACHE_DIR=${NIXOS_NSPAWN_CACHE:-/var/cache/nomad-driver-nixos}
TESTHOST=$REPO_ROOT/e2e/testhost/testhost.sh

BUILD=$REPO_ROOT/build
NOMAD_BIN=$BUILD/nomad
PLUGIN=$BUILD/nomad-driver-nixos
# A directory of its own: the agent loads every executable in plugin_dir that
# has a plugin block, and build/ also holds test binaries and nomad itself.
PLUGIN_DIR=$BUILD/plugins
UNIT=nomad-e2e-agent
# Inside the test host (not bound to the build machine).
DATA_DIR=/var/lib/nomad-e2e
# Writable cgroup v1 controllers for Nomad's client, see setup_cgroups.
# (in the machine's own freezer and cpuset hierarchies: suffixed as e2e/testhost's names)
CG_NAME=nomad-e2e-agent${NIXOS_NSPAWN_INSTANCE:+-$NIXOS_NSPAWN_INSTANCE}
CG_MNT=/run/nomad-e2e-cgroup
ADDR=http://127.0.0.1:4646
PORT=4646
DRIVER=nixos-nspawn
UP_TIMEOUT=${NIXOS_NSPAWN_AGENT_TIMEOUT:-120}
DOWN_TIMEOUT=${NIXOS_NSPAWN_AGENT_DOWN_TIMEOUT:-120}

log() { echo "agent: $*" >&2; }
die() { log "error: $*"; exit 1; }

th() { "$TESTHOST" exec "$@"; }

# No "View ... in the Web UI" hints on stderr.
nomad_cli() { NOMAD_ADDR=$ADDR NOMAD_CLI_SHOW_HINTS=false "$NOMAD_BIN" "$@"; }

# "<node status> detected=<bool> healthy=<bool> (<description>)" of the first node.
node_state() {
	local ids id
	# No `| head`: its early exit would SIGPIPE nomad and fail the pipeline.
	ids=$(nomad_cli node status -t '{{range .}}{{.ID}}{{"\n"}}{{end}}' 2>/dev/null) || return 1
	id=${ids%%$'\n'*}
	[[ $id =~ ^[0-9a-f-]{36}$ ]] || return 1
	nomad_cli node status -t "{{.Status}} {{with index .Drivers \"$DRIVER\"}}detected={{.Detected}} healthy={{.Healthy}} ({{.HealthDescription}}){{else}}no $DRIVER driver{{end}}" "$id" 2>/dev/null
}

is_healthy() {
	local s
	s=$(node_state) || return 1
	[[ $s == "ready detected=true healthy=true "* ]]
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

unit_loaded() {
	[[ $(th systemctl show -P LoadState "$UNIT" 2>/dev/null) == loaded ]] &&
		[[ $(th systemctl show -P ActiveState "$UNIT" 2>/dev/null) != inactive ]]
}

# Copy next to the target and rename: a running agent keeps its old binary
# (no "text file busy") and nobody sees a half-written file.
install_file() {
	local src=$1 dst=$2
	mkdir -p "$(dirname "$dst")"
	cp "$src" "$dst.tmp.$$"
	chmod 0755 "$dst.tmp.$$"
	mv -f "$dst.tmp.$$" "$dst"
}

# Nomad's client on cgroup v1 creates /nomad in the freezer, memory, cpu and
# cpuset hierarchies and fails to start without them. The test host makes only
# memory, cpu, cpuacct and pids writable; give freezer and cpuset a sub-cgroup
# of their own, bound over the read-only mounts as the test host does.
setup_cgroups() {
	th bash -s "$CG_NAME" "$CG_MNT" <<'EOF'
set -euo pipefail
name=$1 mnt=$2
ours() { awk -v t="/sys/fs/cgroup/$1" -v n="/$name" '$5 == t && substr($4, length($4) - length(n) + 1) == n { f = 1 } END { exit !f }' /proc/self/mountinfo; }
for c in freezer cpuset; do
	ours "$c" && continue
	# Cgroup v1 mode only; a cgroup2 host has no per-controller directories.
	[ -d "/sys/fs/cgroup/$c" ] || continue
	mkdir -p "$mnt/$c"
	mountpoint -q "$mnt/$c" || mount -t cgroup -o "$c" cgroup "$mnt/$c"
	mkdir -p "$mnt/$c/$name"
	if [ "$c" = cpuset ]; then
		# A new cpuset cgroup starts empty and accepts no tasks until filled.
		cat "$mnt/$c/cpuset.cpus" >"$mnt/$c/$name/cpuset.cpus"
		cat "$mnt/$c/cpuset.mems" >"$mnt/$c/$name/cpuset.mems"
	fi
	mount --bind "$mnt/$c/$name" "/sys/fs/cgroup/$c"
done
EOF
}

teardown_cgroups() {
	th bash -s "$CG_NAME" "$CG_MNT" <<'EOF'
set -uo pipefail
name=$1 mnt=$2
ours() { awk -v t="/sys/fs/cgroup/$1" -v n="/$name" '$5 == t && substr($4, length($4) - length(n) + 1) == n { f = 1 } END { exit !f }' /proc/self/mountinfo; }
# Depth-first rmdir; cgroup dirs cannot be removed with rm -r.
rmtree() { [ -d "$1" ] && find "$1" -depth -type d -exec rmdir {} + 2>/dev/null; return 0; }
for c in freezer cpuset; do
	while ours "$c"; do umount "/sys/fs/cgroup/$c" || break; done
	if mountpoint -q "$mnt/$c"; then
		rmtree "$mnt/$c/$name"
		umount "$mnt/$c"
	fi
done
for c in memory cpu; do rmtree "/sys/fs/cgroup/$c/nomad"; done
rm -rf "$mnt"
EOF
}

# Purge every job and wait until the machines of their allocations are gone,
# so no machine outlives the agent. Only machines of this agent's allocations
# count: integration tests may run their own nomad-* machines in the host.
stop_jobs() {
	local out
	# shellcheck disable=SC2016 # a Go template, not shell
	out=$(nomad_cli job status -namespace='*' -all-allocs \
		-t '{{range .}}{{$s := .Summary}}job {{$s.Namespace}} {{$s.JobID}}{{"\n"}}{{range .Allocations}}alloc {{.ID}}{{"\n"}}{{end}}{{end}}') ||
		{ log "warning: cannot list jobs"; return 1; }
	local kind a b prefixes=()
	while read -r kind a b; do
		case $kind in
		job)
			log "stopping job $b (namespace $a)"
			nomad_cli job stop -namespace="$a" -purge -yes -detach "$b" >/dev/null
			;;
		alloc) prefixes+=("nomad-${a:0:8}-") ;;
		esac
	done <<<"$out"
	((${#prefixes[@]} > 0)) || return 0

	local deadline=$((SECONDS + DOWN_TIMEOUT)) left p m
	while :; do
		left=()
		while read -r m _; do
			for p in "${prefixes[@]}"; do
				[[ $m == "$p"* ]] && left+=("$m")
			done
		done < <(th machinectl list --no-legend 2>/dev/null || true)
		((${#left[@]} == 0)) && break
		if ((SECONDS >= deadline)); then
			log "warning: machines still running after ${DOWN_TIMEOUT}s: ${left[*]}"
			return 1
		fi
		sleep 0.5
	done
	# Let the client destroy the allocations' directories (and their mounts) itself.
	nomad_cli system gc >/dev/null 2>&1 || true
	sleep 1
}

cmd_down() {
	if ! "$TESTHOST" status; then
		log "test host is not running; nothing to stop"
		return 0
	fi
	local rc=0
	if [[ -x $NOMAD_BIN ]] && port_in_use && unit_loaded; then
		stop_jobs || rc=1
	fi
	if [[ $(th systemctl show -P LoadState "$UNIT" 2>/dev/null) == loaded ]]; then
		log "stopping $UNIT"
		th systemctl stop "$UNIT" 2>/dev/null || true
		th systemctl reset-failed "$UNIT" 2>/dev/null || true
	fi
	# Leftover alloc mounts (secrets tmpfs) must go first; --one-file-system
	# keeps rm out of anything still mounted.
	th bash -c "
		findmnt -rn -o TARGET | grep -E '^$DATA_DIR(/|\$)' | sort -r | xargs -r umount -l
		rm -rf --one-file-system '$DATA_DIR'" || rc=1
	teardown_cgroups || true
	return "$rc"
}

# The binary caches the e2e tests (e2e/caches_test.go) serve on loopback while they run: an S3
# bucket (rclone serve s3), a cache that wants a bearer token, and one that is always down. Their
# credentials are made afresh for each agent, in a directory the test host sees at the same path.
E2E_CACHES=$BUILD/e2e-caches
S3_CACHE="s3://e2e-closure?endpoint=127.0.0.1:4680\&scheme=http\&profile=e2e\&priority=40"
TOKEN_CACHE="http://127.0.0.1:4681/ci"
DOWN_CACHE="http://127.0.0.1:4682/down?priority=1"

new_secret() { head -c 24 /dev/urandom | base64 | tr -d '/+='; }

# render_config SRC DST: the README's configuration, trusting the key that signed the fixture
# closures (e2e/fixtures/build.sh) where the README has its commented example, and naming the
# e2e tests' caches as trusted_substituters with their credentials.
render_config() {
	local key
	key=$(cat "$CACHE_DIR/fixtures/closures/key.pub") || die "no fixture key: run e2e/fixtures/build.sh"
	mkdir -p "$E2E_CACHES"
	chmod 0700 "$E2E_CACHES"
	local id
	id=$(new_secret)
	printf '[e2e]\naws_access_key_id = E2E%s\naws_secret_access_key = %s\n' "${id:0:12}" "$(new_secret)" >"$E2E_CACHES/aws-credentials"
	new_secret >"$E2E_CACHES/token"
	sed "s|^    # trusted_public_keys = .*|    trusted_public_keys = [\"$key\"]\\
    trusted_substituters = [\"$S3_CACHE\", \"$TOKEN_CACHE\", \"$DOWN_CACHE\"]\\
    aws_credentials_file = \"$E2E_CACHES/aws-credentials\"\\
    bearer_token {\\
      cache = \"$TOKEN_CACHE\"\\
      file  = \"$E2E_CACHES/token\"\\
    }|" "$1" >"$2.tmp"
	grep -q "trusted_public_keys = \[\"$key\"\]" "$2.tmp" || die "$1 has no trusted_public_keys line to fill in"
	mv "$2.tmp" "$2"
	# Without the caches: what a plugin of before they came accepts (e2e/upgrade_test.go).
	sed "s|^    # trusted_public_keys = .*|    trusted_public_keys = [\"$key\"]|" "$1" >"${2%.hcl}-base.hcl"
}

cmd_up() {
	[[ -x $PLUGIN ]] || die "$PLUGIN is missing (run: make build)"
	local nomad_src
	nomad_src=$("$REPO_ROOT/e2e/nomad/build.sh")
	"$TESTHOST" up

	if unit_loaded || th test -e "$DATA_DIR"; then
		log "an agent ran before; stopping it for a fresh start"
		cmd_down || log "warning: the previous agent did not stop cleanly"
	fi
	if port_in_use; then
		die "127.0.0.1:$PORT is in use by something else (not $UNIT in the test host)"
	fi

	# The repo is bound into the test host at the same path; the cache dir is not.
	install_file "$nomad_src" "$NOMAD_BIN"
	install_file "$PLUGIN" "$PLUGIN_DIR/nomad-driver-nixos"

	setup_cgroups
	th mkdir -p "$DATA_DIR"
	render_config "$SCRIPT_DIR/agent.hcl" "$REPO_ROOT/build/agent.hcl"
	log "starting $UNIT"
	# A single-node server and client keeping their state in DATA_DIR (not -dev, whose
	# in-memory server forgets every job when the agent restarts, which the e2e suite does).
	# A transient unit outlives this exec. env -u: the machine's AWS_CA_BUNDLE
	# makes Nomad's AWS fingerprinter fail the whole client (test-environment.md);
	# the unit gets systemd's environment anyway, this keeps it so.
	th systemd-run --quiet --unit="$UNIT" --description="Nomad e2e agent ($REPO_ROOT)" \
		-p KillMode=mixed -p TimeoutStopSec=60 \
		/usr/bin/env -u AWS_CA_BUNDLE "$NOMAD_BIN" agent -server -client -bootstrap-expect=1 \
		-bind=127.0.0.1 -network-interface=lo \
		-config="$REPO_ROOT/build/agent.hcl" -plugin-dir="$PLUGIN_DIR" -data-dir="$DATA_DIR"

	local start=$SECONDS state=""
	while ((SECONDS - start < UP_TIMEOUT)); do
		if is_healthy; then
			log "ready after $((SECONDS - start))s: $ADDR (driver $DRIVER healthy)"
			return 0
		fi
		state=$(node_state || echo "API not answering")
		if [[ $(th systemctl show -P ActiveState "$UNIT") != active ]]; then
			th journalctl -u "$UNIT" --no-pager -n 60 >&2 || true
			die "$UNIT is not running"
		fi
		sleep 1
	done
	th journalctl -u "$UNIT" --no-pager -n 60 >&2 || true
	die "agent not ready with a healthy $DRIVER driver after ${UP_TIMEOUT}s (last: $state)"
}

cmd_status() {
	"$TESTHOST" status || { log "test host is not running"; return 1; }
	local s
	s=$(node_state) || { log "agent does not answer on $ADDR"; return 1; }
	echo "$s"
	is_healthy
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
logs)
	shift
	th journalctl -u "$UNIT" --no-pager "$@"
	;;
*)
	echo "usage: $0 {up|down|status|logs [JOURNALCTL ARGS...]}" >&2
	exit 2
	;;
esac

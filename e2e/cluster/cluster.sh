#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# cluster.sh: a three-node Nomad cluster on one machine for the multi-node e2e
# test (e2e/cluster_test.go): one server and two clients, each its own booted
# systemd test host (the rootfs of e2e/testhost, booted from a private overlay),
# on a private network that exists only on this machine:
#
#   netns nxcl          bridge nxcl0 10.231.0.1/24 (and the test process)
#   netns nxcl-server   eth0 10.231.0.10  host nxcl-server   nomad server
#   netns nxcl-client1  eth0 10.231.0.11  host nxcl-client1  nomad client + driver
#   netns nxcl-client2  eth0 10.231.0.12  host nxcl-client2  nomad client + driver
#
# Nothing is added to the machine's own network namespace (no links, no
# routes), so the API at http://10.231.0.10:4646 is reachable only from inside
# netns nxcl: `cluster.sh nomad ...`, `cluster.sh netns-exec CMD`, or
# `go test -exec "cluster.sh netns-exec"` (what `cluster.sh test` does).
# The single-node test host (nixos-testhost, 127.0.0.1:4646) is not touched.
#
#   cluster.sh up          boot the hosts and start the agents (fresh state);
#                          waits until both clients are ready with a healthy
#                          nixos-nspawn driver; returns at once if already so
#   cluster.sh down        stop everything and remove namespaces, links,
#                          cgroups and roots; idempotent
#   cluster.sh status      print the nodes; exit 0 if the cluster is ready
#   cluster.sh exec NODE CMD...      run CMD in a host (server, client1, client2)
#   cluster.sh nomad ARGS...         the nomad CLI against the cluster
#   cluster.sh netns-exec CMD...     run CMD on the private network
#   cluster.sh logs NODE [JOURNALCTL ARGS...]   that host's agent journal
#   cluster.sh test [GO TEST ARGS...]           the cluster e2e tests
#
# Needs `make build`, e2e/nomad/build.sh (cached Nomad) and the fixtures
# (e2e/fixtures/build.sh) for the test.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
TESTHOST=$REPO_ROOT/e2e/testhost/testhost.sh
LOG_TAG=cluster
# shellcheck source-path=SCRIPTDIR source=../lib/host.sh
. "$REPO_ROOT/e2e/lib/host.sh"

CACHE_DIR=${NIXOS_NSPAWN_CACHE:-/var/cache/nomad-driver-nixos}
ROOTFS=$CACHE_DIR/testhost-rootfs
# A clean copy of ROOTFS: the single-node test host boots ROOTFS itself and
# writes its state (machine-id, journal, agent and driver data) into it.
BASE=$CACHE_DIR/cluster-rootfs
BASE_RECIPE=cluster-v1
RUN_DIR=/run/nomad-driver-nixos-cluster
LOCK_FILE=/run/nomad-driver-nixos-cluster.lock

BUILD=$REPO_ROOT/build
# Copies of their own: cluster.sh never replaces a binary the single-node agent runs.
CL_BUILD=$BUILD/cluster
NOMAD_BIN=$CL_BUILD/nomad
PLUGIN_DIR=$CL_BUILD/plugins
PLUGIN=$BUILD/nomad-driver-nixos
FIXTURES_ENV=$CACHE_DIR/fixtures.env

PREFIX=nxcl
NETNS=$PREFIX
BRIDGE=${PREFIX}0
NET=10.231.0
BRIDGE_ADDR=$NET.1
NODES=(server client1 client2)
CLIENTS=(client1 client2)
declare -A ADDR=([server]=$NET.10 [client1]=$NET.11 [client2]=$NET.12)
SERVER_ADDR=http://${ADDR[server]}:4646
# memory..pids: systemd's accounting in the hosts (as e2e/testhost); freezer and
# cpuset: Nomad's client on cgroup v1 (as e2e/agent's setup_cgroups).
CONTROLLERS=(memory cpu cpuacct pids freezer cpuset)
UNIT=nomad-cluster-agent
DATA_DIR=/var/lib/nomad-cluster
DRIVER=nixos-nspawn
BOOT_TIMEOUT=${NIXOS_NSPAWN_CLUSTER_BOOT_TIMEOUT:-90}
UP_TIMEOUT=${NIXOS_NSPAWN_CLUSTER_TIMEOUT:-120}

machine() { echo "$PREFIX-$1"; }
node_ns() { echo "$PREFIX-$1"; }
node_dir() { echo "$RUN_DIR/$1"; }
# Suffixed as e2e/testhost's names: cgroups are the one thing a private /run and netns do not separate.
cg_name() { echo "nixos-nspawn-$PREFIX-$1${NIXOS_NSPAWN_INSTANCE:+-$NIXOS_NSPAWN_INSTANCE}"; }

# Accept "client1" and "nxcl-client1".
node_arg() {
	local n=${1#"$PREFIX-"} x
	for x in "${NODES[@]}"; do [[ $n == "$x" ]] && echo "$n" && return 0; done
	die "no such node '$1' (one of: ${NODES[*]})"
}

nspawn_pid() { host_nspawn_pid "$(node_dir "$1")"; }
leader_pid() { host_leader_pid "$(node_dir "$1")"; }
node_running() { host_running "$(node_dir "$1")"; }

# Every systemd-nspawn process booting machine $1, found by its command line
# (so even a run dir lost to a crash leaves nothing running).
nspawn_pids_of() {
	local m=$1 p
	for p in /proc/[0-9]*; do
		[[ $(cat "$p/comm" 2>/dev/null) == systemd-nspawn ]] || continue
		if tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qx -- "--machine=$m"; then
			echo "${p#/proc/}"
		fi
	done
}

guest() {
	local node=$1
	shift
	host_guest "$(node_dir "$node")" "$@"
}

in_net() { ip netns exec "$NETNS" "$@"; }

# No "View ... in the Web UI" hints on stderr.
nomad_cli() { in_net env NOMAD_ADDR="$SERVER_ADDR" NOMAD_CLI_SHOW_HINTS=false "$NOMAD_BIN" "$@"; }

# ---------------------------------------------------------------- rootfs

base_stamp() {
	# The recipe, plus which ROOTFS build it was copied from.
	echo "$BASE_RECIPE $(cat "$ROOTFS/.testhost-version") $(stat -c %Y "$ROOTFS/.testhost-version")"
}

ensure_base() {
	# testhost.sh rootfs: packages and the (cached) debootstrap; it never touches a running test host.
	"$TESTHOST" rootfs >/dev/null
	if [[ -f $BASE/.cluster-version && $(cat "$BASE/.cluster-version") == "$(base_stamp)" ]]; then
		return 0
	fi
	local lock_fd rlock_fd
	exec {lock_fd}>"$CACHE_DIR/.cluster-rootfs.lock"
	flock "$lock_fd"
	# A shared hold of testhost.sh's build lock: ROOTFS is not swapped while we copy it.
	exec {rlock_fd}>"$CACHE_DIR/.testhost-rootfs.lock"
	flock -s "$rlock_fd"
	local stamp
	stamp=$(base_stamp)
	if [[ -f $BASE/.cluster-version && $(cat "$BASE/.cluster-version") == "$stamp" ]]; then
		exec {rlock_fd}>&- {lock_fd}>&-
		return 0
	fi
	local tmp=$CACHE_DIR/.cluster-rootfs.tmp.$$
	rm -rf "$tmp" "$CACHE_DIR"/.cluster-rootfs.tmp.* "$CACHE_DIR/.cluster-rootfs.old"
	mkdir -p "$tmp"
	log "copying $ROOTFS into $BASE"
	# The test host may be running on ROOTFS: leave out what it writes.
	local st
	set +o pipefail
	tar -C "$ROOTFS" --xattrs --xattrs-include='*' --acls \
		--exclude=./var/log/journal/* --exclude=./var/lib/nomad-e2e --exclude=./var/lib/nomad-driver-nixos \
		--exclude=./var/lib/nixos-smoke --exclude=./var/lib/alloc_mounts --exclude=./var/lib/machines/* \
		--exclude=./tmp/* --exclude=./var/tmp/* --exclude=./work \
		--warning=no-file-changed --warning=no-file-removed -cf - . |
		tar -C "$tmp" --xattrs --xattrs-include='*' --acls -xf -
	st=("${PIPESTATUS[@]}")
	set -o pipefail
	# tar -c exits 1 when a file changed while read (a log of the running test host): harmless.
	if ((st[0] > 1 || st[1] != 0)); then
		rm -rf "$tmp"
		die "copying $ROOTFS failed (tar: ${st[*]})"
	fi
	# Each host gets its own machine-id and hostname in its overlay (start_node).
	: >"$tmp/etc/machine-id"
	echo "$stamp" >"$tmp/.cluster-version"
	if [[ -e $BASE ]]; then mv "$BASE" "$CACHE_DIR/.cluster-rootfs.old"; fi
	mv "$tmp" "$BASE"
	rm -rf "$CACHE_DIR/.cluster-rootfs.old"
	exec {rlock_fd}>&- {lock_fd}>&-
}

# ---------------------------------------------------------------- network

setup_network() {
	ip netns add "$NETNS"
	ip -n "$NETNS" link set lo up
	ip -n "$NETNS" link add "$BRIDGE" type bridge
	ip -n "$NETNS" addr add "$BRIDGE_ADDR/24" dev "$BRIDGE"
	ip -n "$NETNS" link set "$BRIDGE" up
	local n ns
	for n in "${NODES[@]}"; do
		ns=$(node_ns "$n")
		ip netns add "$ns"
		ip -n "$ns" link set lo up
		# Created in the bridge's namespace with the peer straight in the host's:
		# no end ever shows up in the machine's own namespace.
		ip -n "$NETNS" link add "$PREFIX-$n" type veth peer name eth0 netns "$ns"
		ip -n "$NETNS" link set "$PREFIX-$n" master "$BRIDGE" up
		ip -n "$ns" addr add "${ADDR[$n]}/24" dev eth0
		ip -n "$ns" link set eth0 up
	done
}

teardown_network() {
	local n
	# Deleting a namespace destroys its links, and the veth peers with them.
	for n in "${NODES[@]}"; do
		if [[ -e /run/netns/$(node_ns "$n") ]]; then ip netns del "$(node_ns "$n")" || true; fi
	done
	if [[ -e /run/netns/$NETNS ]]; then ip netns del "$NETNS" || true; fi
}

# ---------------------------------------------------------------- hosts

start_node() {
	local node=$1 dir m
	dir=$(node_dir "$node")
	m=$(machine "$node")
	mkdir -p "$dir/upper" "$dir/work" "$dir/root"
	# A private copy-on-write root: boots in well under a second, where
	# --ephemeral copies the whole tree on ext4 (measured: 0.7 s vs 2.4 s for three).
	mount -t overlay "overlay-$m" -o "lowerdir=$BASE,upperdir=$dir/upper,workdir=$dir/work" "$dir/root"
	echo "$m" >"$dir/root/etc/hostname"
	systemd-id128 new >"$dir/root/etc/machine-id"
	host_start "$dir" "$(cg_name "$node")" "${CONTROLLERS[*]}" --register=no --keep-unit -D "$dir/root" -b \
		--capability=all --machine="$m" --network-namespace-path="/run/netns/$(node_ns "$node")" \
		--bind=/nix --bind-ro="$REPO_ROOT:$REPO_ROOT"
}

# Wait for the host's systemd, then give it writable cgroup controllers.
finish_node() {
	local dir
	dir=$(node_dir "$1")
	host_wait_boot "$dir" "$(machine "$1")" "$BOOT_TIMEOUT"
	host_setup_cgroups "$dir"
}

start_agent() {
	local node=$1 role_args
	if [[ $node == server ]]; then
		role_args=(-config="$SCRIPT_DIR/server.hcl")
	else
		role_args=(-config="$SCRIPT_DIR/client.hcl" -network-interface=eth0
			-servers="${ADDR[server]}:4647" -plugin-dir="$PLUGIN_DIR")
	fi
	# A transient unit of the host's systemd; env -u: the machine's AWS_CA_BUNDLE
	# fails Nomad's client (test-environment.md); systemd's environment has none, this keeps it so.
	guest "$node" systemd-run --quiet --unit="$UNIT" --description="Nomad cluster agent ($REPO_ROOT)" \
		-p KillMode=mixed -p TimeoutStopSec=30 \
		/usr/bin/env -u AWS_CA_BUNDLE "$NOMAD_BIN" agent -bind="${ADDR[$node]}" \
		-node="$(machine "$node")" -data-dir="$DATA_DIR" "${role_args[@]}"
}

# Every process whose root ("/") is the host's overlay, named overlay-<machine>
# (start_node): its init and what runs in it. /proc/PID/root cannot tell: it
# reads "/" for a process that pivoted into a mount we do not see.
procs_of() {
	local m=$1
	grep -lsE "^[0-9]+ [0-9]+ [0-9]+:[0-9]+ [^ ]+ / .* - overlay overlay-$m " /proc/[0-9]*/mountinfo |
		sed -E 's|^/proc/([0-9]+)/mountinfo$|\1|' || true
}

stop_node() {
	local node=$1 m pids p i
	m=$(machine "$node")
	pids=$( (
		nspawn_pid "$node"
		nspawn_pids_of "$m"
	) | sort -u)
	for p in $pids; do stop_nspawn "$p" "$m" 30 & done
	wait
	# A killed nspawn leaves the host's PID namespace running; killing its
	# init (found by its root, the overlay) ends it and everything in it.
	for ((i = 0; i < 50; i++)); do
		pids=$(procs_of "$m")
		[[ -z $pids ]] && return 0
		((i == 0)) && log "killing what is left of $m: ${pids//$'\n'/ }"
		# shellcheck disable=SC2086 # one pid a word
		kill -KILL $pids 2>/dev/null || true
		sleep 0.1
	done
	log "warning: processes of $m survive: ${pids//$'\n'/ }"
}

# ---------------------------------------------------------------- cluster

# One line per client node: "<name> <status> <detected> <healthy>".
node_lines() {
	nomad_cli node status \
		-t "{{range .}}{{.Name}} {{.Status}} {{with index .Drivers \"$DRIVER\"}}{{.Detected}} {{.Healthy}}{{else}}- -{{end}}{{\"\\n\"}}{{end}}" 2>/dev/null
}

cluster_ready() {
	local lines n
	lines=$(node_lines) || return 1
	for n in "${CLIENTS[@]}"; do
		grep -qx "$(machine "$n") ready true true" <<<"$lines" || return 1
	done
}

# Copy next to the target and rename: a running agent keeps its old binary.
install_file() {
	local src=$1 dst=$2
	if [[ -x $dst ]] && cmp -s "$src" "$dst"; then return 0; fi
	mkdir -p "$(dirname "$dst")"
	cp "$src" "$dst.tmp.$$"
	chmod 0755 "$dst.tmp.$$"
	mv -f "$dst.tmp.$$" "$dst"
}

all_running() {
	local n
	for n in "${NODES[@]}"; do
		node_running "$n" && [[ $(guest "$n" systemctl is-active "$UNIT" 2>/dev/null) == active ]] || return 1
	done
}

cmd_up() {
	[[ -x $PLUGIN ]] || die "$PLUGIN is missing (run: make build)"
	local t0 nomad_src
	t0=$(now_us)
	nomad_src=$("$REPO_ROOT/e2e/nomad/build.sh")
	if [[ -f $RUN_DIR/ready ]] && all_running && [[ $(cat "$RUN_DIR/checkout" 2>/dev/null) == "$REPO_ROOT" ]] &&
		cmp -s "$PLUGIN" "$PLUGIN_DIR/nomad-driver-nixos" && cluster_ready; then
		log "already up: $SERVER_ADDR (netns $NETNS)"
		return 0
	fi
	if [[ -e $RUN_DIR || -e /run/netns/$NETNS ]] || compgen -G "/sys/fs/cgroup/*/$(cg_name '*')" >/dev/null; then
		# Half set up, another checkout or an older plugin: start over rather than guess.
		log "a cluster is there; stopping it for a fresh start"
		cmd_down
	fi
	ensure_base
	install_file "$nomad_src" "$NOMAD_BIN"
	install_file "$PLUGIN" "$PLUGIN_DIR/nomad-driver-nixos"
	# The e2e helpers run build/nomad as the CLI; e2e/agent installs the same file.
	install_file "$nomad_src" "$BUILD/nomad"
	local t_prep
	t_prep=$(now_us)
	log "prepared in $(since "$t0")"

	mkdir -p "$RUN_DIR"
	echo "$REPO_ROOT" >"$RUN_DIR/checkout"
	setup_network
	local n
	# Boot the three hosts in parallel; each takes about half a second.
	for n in "${NODES[@]}"; do start_node "$n"; done
	for n in "${NODES[@]}"; do finish_node "$n"; done
	log "hosts booted in $(since "$t_prep")"
	for n in "${NODES[@]}"; do guest "$n" mkdir -p "$DATA_DIR"; done
	local start=$SECONDS t_agents lines=""
	t_agents=$(now_us)
	# Server first: a client whose first registration meets a server without a
	# leader retries only after 15-30 s.
	start_agent server
	local answer
	# </dev/null: operator api sends stdin as a POST body when stdin is a file or a pipe (as
	# where CI runs this script), which /v1/status/leader refuses ("Invalid method").
	until answer=$(nomad_cli operator api /v1/status/leader </dev/null 2>&1) && [[ $answer == *:4647* ]]; do
		if ((SECONDS - start >= UP_TIMEOUT)); then
			guest server journalctl -u "$UNIT" --no-pager -n 60 >&2 || true
			in_net ip -br addr >&2 || true
			guest server ss -ltn >&2 || true
			die "the server has no leader after ${UP_TIMEOUT}s; the last answer to the nomad CLI in netns $NETNS: $answer"
		fi
		sleep 0.2
	done
	log "server has a leader after $(since "$t_agents")"
	for n in "${CLIENTS[@]}"; do start_agent "$n"; done
	while ((SECONDS - start < UP_TIMEOUT)); do
		if cluster_ready; then
			touch "$RUN_DIR/ready"
			log "ready after $(since "$t0") (agents $(since "$t_agents")): $SERVER_ADDR in netns $NETNS"
			node_lines >&2 || true
			return 0
		fi
		for n in "${NODES[@]}"; do
			if [[ $(guest "$n" systemctl show -P ActiveState "$UNIT") != active ]]; then
				guest "$n" journalctl -u "$UNIT" --no-pager -n 60 >&2 || true
				die "$UNIT on $(machine "$n") is not running"
			fi
		done
		sleep 0.5
	done
	lines=$(node_lines || echo "server API not answering")
	for n in "${NODES[@]}"; do
		log "== $(machine "$n")"
		guest "$n" journalctl -u "$UNIT" --no-pager -n 30 >&2 || true
	done
	die "cluster not ready after ${UP_TIMEOUT}s; nodes: ${lines//$'\n'/; }"
}

cmd_down() {
	local n dir t0
	t0=$(now_us)
	for n in "${NODES[@]}"; do stop_node "$n" & done
	wait
	for n in "${NODES[@]}"; do
		dir=$(node_dir "$n")
		if mountpoint -q "$dir/root"; then umount "$dir/root" || umount -l "$dir/root"; fi
		cg_remove "$(cg_name "$n")" "${CONTROLLERS[@]}" "${HOST_TREES[@]}"
	done
	teardown_network
	# --one-file-system: never into anything still mounted.
	rm -rf --one-file-system "$RUN_DIR"
	log "down in $(since "$t0")"
}

cmd_status() {
	local n ok=0
	for n in "${NODES[@]}"; do
		if node_running "$n"; then
			echo "$(machine "$n") ${ADDR[$n]} running (nspawn pid $(nspawn_pid "$n"))"
		else
			echo "$(machine "$n") ${ADDR[$n]} not running"
			ok=1
		fi
	done
	((ok == 0)) || return 1
	[[ -f $RUN_DIR/ready ]] || { log "not (yet) set up"; return 1; }
	node_lines || { log "server does not answer on $SERVER_ADDR"; return 1; }
	cluster_ready
}

cmd_exec() {
	(($# > 1)) || die "usage: cluster.sh exec NODE CMD [ARGS...]"
	local node
	node=$(node_arg "$1")
	shift
	node_running "$node" || die "$(machine "$node") is not running (run: $0 up)"
	host_exec "$(node_dir "$node")" "$@"
}

cmd_test() {
	[[ -f $FIXTURES_ENV ]] || die "$FIXTURES_ENV is missing (run: e2e/fixtures/build.sh)"
	set -a
	# shellcheck disable=SC1090
	. "$FIXTURES_ENV"
	set +a
	cd "$REPO_ROOT"
	# The test binary runs on the private network, where the server's address answers.
	NOMAD_ADDR=$SERVER_ADDR exec go test -count=1 -tags e2e,e2e_cluster -exec "$SCRIPT_DIR/cluster.sh netns-exec" \
		-run '^TestCluster' -v -timeout 20m "$@" ./e2e/
}

case ${1:-} in
up)
	lock "$LOCK_FILE"
	cmd_up
	;;
down)
	lock "$LOCK_FILE"
	cmd_down
	;;
status) cmd_status ;;
exec)
	shift
	cmd_exec "$@"
	;;
nomad)
	shift
	[[ -e /run/netns/$NETNS ]] || die "the cluster is not up (run: $0 up)"
	nomad_cli "$@"
	;;
netns-exec)
	shift
	[[ -e /run/netns/$NETNS ]] || die "the cluster is not up (run: $0 up)"
	exec ip netns exec "$NETNS" "$@"
	;;
logs)
	shift
	(($# > 0)) || die "usage: cluster.sh logs NODE [JOURNALCTL ARGS...]"
	n=$(node_arg "$1")
	shift
	node_running "$n" || die "$(machine "$n") is not running"
	guest "$n" journalctl -u "$UNIT" --no-pager "$@"
	;;
test)
	shift
	cmd_test "$@"
	;;
*)
	echo "usage: $0 {up|down|status|exec NODE CMD...|nomad ARGS...|netns-exec CMD...|logs NODE|test [ARGS...]}" >&2
	exit 2
	;;
esac

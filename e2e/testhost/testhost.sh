#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# testhost.sh: boot a Debian bookworm systemd "test host" as a container.
# The CI machine's PID 1 is not systemd, so everything that needs systemd,
# D-Bus and machined (the driver's e2e tests) runs inside this host.
#
#   testhost.sh up        build (cached) and boot the test host; idempotent
#   testhost.sh exec CMD  run CMD inside it (stdio and exit code pass through)
#   testhost.sh down      stop it and clean up; idempotent
#   testhost.sh status    exit 0 if it is running and set up
#   testhost.sh rootfs    only build (cached) the rootfs and print its path;
#                         e2e/fixtures/build.sh takes Debian's systemd from it
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

CACHE_DIR=${NIXOS_NSPAWN_CACHE:-/var/cache/nomad-driver-nixos}
ROOTFS=$CACHE_DIR/testhost-rootfs
SHARE_DIR=${NIXOS_NSPAWN_SHARE:-$REPO_ROOT}
RUN_DIR=/run/nomad-driver-nixos-testhost
# NIXOS_NSPAWN_INSTANCE names a second, independent set of test hosts on one machine (e2e/fresh runs
# one beside the shared one): it suffixes every name the machine sees, the cgroups here.
INSTANCE=${NIXOS_NSPAWN_INSTANCE:+-$NIXOS_NSPAWN_INSTANCE}
MACHINE=nixos-testhost$INSTANCE
CG_NAME=nixos-nspawn-testhost$INSTANCE
CONTROLLERS=(memory cpu cpuacct pids)
SUITE=bookworm
INCLUDE=systemd,systemd-sysv,dbus,systemd-container,iproute2,e2fsprogs,util-linux,procps
# Installed after debootstrap: its perl dependencies fail debootstrap's own configure pass.
# Nix makes the host's Nix store (bound from the build machine) writable to the driver.
EXTRA_PACKAGES=(nix-bin)
# Bump when the rootfs recipe changes; the stamp mismatch forces a rebuild.
ROOTFS_VERSION="v2 $SUITE minbase $INCLUDE ${EXTRA_PACKAGES[*]}"
BOOT_TIMEOUT=${NIXOS_NSPAWN_TESTHOST_BOOT_TIMEOUT:-90}
GUEST_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "testhost: $*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_packages() {
	local want=(systemd-container debootstrap busybox-static nix-bin e2fsprogs util-linux iproute2)
	local missing=() p
	for p in "${want[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The machine's own Debian mirror (deb822 sources), so debootstrap uses what apt can reach.
debian_mirror() {
	if [[ -n ${NIXOS_NSPAWN_DEBIAN_MIRROR:-} ]]; then
		echo "$NIXOS_NSPAWN_DEBIAN_MIRROR"
		return
	fi
	local uri
	# deb822 files first, then one-line "deb URI suite ..." sources.
	uri=$({
		grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
		grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print ($2 ~ /^\[/) ? $3 : $2}'
	} 2>/dev/null | grep -E '/debian/?$' | head -n1 || true)
	[[ -n $uri ]] || die "no Debian mirror in apt's sources; set NIXOS_NSPAWN_DEBIAN_MIRROR"
	echo "$uri"
}

ensure_rootfs() {
	if [[ -f $ROOTFS/.testhost-version && $(cat "$ROOTFS/.testhost-version") == "$ROOTFS_VERSION" ]]; then
		return 0
	fi
	mkdir -p "$CACHE_DIR"
	# Serialise builds (build.sh may ask for the rootfs while up runs).
	local lock_fd
	exec {lock_fd}>"$CACHE_DIR/.testhost-rootfs.lock"
	flock "$lock_fd"
	if [[ -f $ROOTFS/.testhost-version && $(cat "$ROOTFS/.testhost-version") == "$ROOTFS_VERSION" ]]; then
		exec {lock_fd}>&-
		return 0
	fi
	local tmp="$CACHE_DIR/.testhost-rootfs.tmp.$$"
	rm -rf "$tmp" "$CACHE_DIR"/.testhost-rootfs.tmp.* "$CACHE_DIR"/.testhost-rootfs.old
	log "debootstrap $SUITE into $tmp (about a minute)"
	if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$tmp" "$(debian_mirror)" \
		>"$CACHE_DIR/debootstrap.log" 2>&1; then
		tail -n 20 "$CACHE_DIR/debootstrap.log" >&2
		rm -rf "$tmp"
		die "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"
	fi
	if ! chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		"${EXTRA_PACKAGES[@]}" >>"$CACHE_DIR/debootstrap.log" 2>&1; then
		tail -n 20 "$CACHE_DIR/debootstrap.log" >&2
		rm -rf "$tmp"
		die "installing ${EXTRA_PACKAGES[*]} failed (log: $CACHE_DIR/debootstrap.log)"
	fi
	# Keep the image small and boot quiet: no docs, no apt lists.
	rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
	echo nixos-testhost >"$tmp/etc/hostname"
	# The driver runs nix-store in here: Nix gets its settings from this file, not from defaults
	# that name a nixbld group Debian's nix-bin never creates.
	mkdir -p "$tmp/etc/nix"
	printf '%s\n' '# Written by e2e/testhost/testhost.sh.' 'build-users-group =' >"$tmp/etc/nix/nix.conf"
	: >"$tmp/etc/machine-id"
	# Units that only fail or wait for hardware inside a container.
	local u
	for u in systemd-networkd-wait-online.service getty@tty1.service console-getty.service \
		systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer; do
		ln -sf /dev/null "$tmp/etc/systemd/system/$u"
	done
	echo "$ROOTFS_VERSION" >"$tmp/.testhost-version"
	# Atomic swap: a half-built tree never carries the stamp under the final name.
	if [[ -e $ROOTFS ]]; then mv "$ROOTFS" "$CACHE_DIR/.testhost-rootfs.old"; fi
	mv "$tmp" "$ROOTFS"
	rm -rf "$CACHE_DIR/.testhost-rootfs.old"
	exec {lock_fd}>&-
}

# pid exists and is not a zombie (our own background child lingers as one until reaped).
alive() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != Z ]]
}

# pid is alive and its command name matches.
pid_is() {
	local pid=$1 comm=$2
	[[ -n $pid ]] && alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

nspawn_pid() { cat "$RUN_DIR/nspawn.pid" 2>/dev/null || true; }
leader_pid() { cat "$RUN_DIR/leader.pid" 2>/dev/null || true; }

is_running() { pid_is "$(nspawn_pid)" systemd-nspawn && pid_is "$(leader_pid)" systemd; }
is_ready() { is_running && [[ -f $RUN_DIR/ready ]]; }

# Run a command in the test host with a clean environment.
guest() {
	nsenter -t "$(leader_pid)" -a env -i PATH="$GUEST_PATH" HOME=/root LANG=C.UTF-8 "$@"
}

# nspawn builds the host's systemd cgroup tree below the cgroup it starts in; a cgroup of its own
# in the systemd and unified hierarchies keeps other systemd hosts on the machine out of it.
OWN_HIERARCHIES=(systemd unified)

cg_create() {
	local c
	for c in "${CONTROLLERS[@]}" "${OWN_HIERARCHIES[@]}"; do
		mkdir -p "/sys/fs/cgroup/$c/$CG_NAME"
	done
}

# Depth-first rmdir; cgroup dirs cannot be removed with rm -r.
cg_remove() {
	local c d
	for c in "${CONTROLLERS[@]}" "${OWN_HIERARCHIES[@]}"; do
		d=/sys/fs/cgroup/$c/$CG_NAME
		[[ -d $d ]] || continue
		find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
		[[ -d $d ]] && log "warning: could not remove $d"
	done
	return 0
}

boot() {
	mkdir -p "$RUN_DIR"
	rm -f "$RUN_DIR/ready"
	cg_create
	# The fixture closures (binary caches, export streams) are read where build.sh made them.
	mkdir -p "$CACHE_DIR/fixtures"
	local args=(--register=no --keep-unit -D "$ROOTFS" -b --capability=all -M "$MACHINE"
		--bind=/nix --bind="$SHARE_DIR:$SHARE_DIR" --bind-ro="$CACHE_DIR/fixtures:$CACHE_DIR/fixtures")
	local c
	for c in "${CONTROLLERS[@]}"; do
		# Binds directly under /sys/fs/cgroup are hidden by nspawn's /sys mount.
		args+=(--bind="/sys/fs/cgroup/$c/$CG_NAME:/run/hostcg/$c")
	done
	# The fixtures' store appears inside even if it is populated after boot.
	mkdir -p /nix
	log "booting $MACHINE"
	(
		# The container must not inherit (and so hold forever) the up/down lock.
		if [[ -n ${LOCK_FD:-} ]]; then exec {LOCK_FD}>&-; fi
		for c in "${OWN_HIERARCHIES[@]}"; do
			echo "$BASHPID" >"/sys/fs/cgroup/$c/$CG_NAME/cgroup.procs"
		done
		exec setsid systemd-nspawn "${args[@]}" </dev/null >"$RUN_DIR/console.log" 2>&1
	) &
	local npid=$!
	echo "$npid" >"$RUN_DIR/nspawn.pid"

	# The container's PID 1 ends up as the only child of the nspawn process.
	local lpid="" i
	for ((i = 0; i < 100; i++)); do
		# comm reads "setsid" until the exec; only a vanished pid is fatal.
		alive "$npid" || { tail -n 30 "$RUN_DIR/console.log" >&2; die "systemd-nspawn exited"; }
		lpid=$(awk '{print $1}' "/proc/$npid/task/$npid/children" 2>/dev/null || true)
		if pid_is "$lpid" systemd; then break; fi
		lpid=""
		sleep 0.1
	done
	[[ -n $lpid ]] || die "no container init found under nspawn pid $npid"
	echo "$lpid" >"$RUN_DIR/leader.pid"

	local state=""
	for ((i = 0; i < BOOT_TIMEOUT * 2; i++)); do
		state=$(guest systemctl is-system-running 2>/dev/null || true)
		case $state in running | degraded) break ;; esac
		pid_is "$npid" systemd-nspawn || die "systemd-nspawn exited during boot"
		sleep 0.5
	done
	case $state in running | degraded) ;; *) die "test host did not finish booting (state '$state')" ;; esac
	log "booted ($state)"
}

# Give the host's systemd real (writable) v1 controllers so units get accounting and limits.
setup_cgroups() {
	local c
	for c in "${CONTROLLERS[@]}"; do
		guest sh -c "set -e
			# cpu and cpuacct are separate hierarchies here but may be a joint mount elsewhere.
			t=/sys/fs/cgroup/$c
			if [ -L \$t ]; then t=\$(readlink -f \$t); fi
			[ -d \$t ] || exit 0
			if ! grep -q ' /run/hostcg/$c ' /proc/self/mountinfo; then echo 'missing /run/hostcg/$c' >&2; exit 1; fi
			mount --bind /run/hostcg/$c \$t"
	done
	# systemd probes controllers only at start; reexec makes it see the writable ones.
	guest systemctl daemon-reexec
	local i
	for ((i = 0; i < 60; i++)); do
		case $(guest systemctl is-system-running 2>/dev/null || true) in running | degraded) break ;; esac
		sleep 0.25
	done
}

verify() {
	guest systemd-run --quiet --wait -p MemoryMax=64M true ||
		die "systemd-run with MemoryMax failed"
	guest systemd-run --quiet --unit=testhost-memcheck -p MemoryMax=64M sleep 30 >/dev/null
	local mem
	mem=$(guest systemctl show -P MemoryCurrent testhost-memcheck.service)
	guest systemctl stop testhost-memcheck.service >/dev/null 2>&1 || true
	[[ $mem =~ ^[0-9]+$ ]] || die "no memory accounting in the test host (MemoryCurrent='$mem')"
	guest machinectl list --no-legend >/dev/null || die "machinectl does not work in the test host"
	guest sh -c 'command -v chattr && command -v nsenter && command -v systemd-nspawn' >/dev/null ||
		die "chattr/nsenter/systemd-nspawn missing in the test host"
}

cmd_up() {
	# A host that binds another checkout would run that checkout's test binaries.
	if is_ready && [[ $(cat "$RUN_DIR/share" 2>/dev/null) == "$SHARE_DIR" ]]; then
		return 0
	fi
	if is_running || [[ -d $RUN_DIR ]]; then
		# Half set up (e.g. an interrupted up): start over rather than guess.
		cmd_down
	fi
	ensure_packages
	ensure_rootfs
	boot
	setup_cgroups
	verify
	echo "$SHARE_DIR" >"$RUN_DIR/share"
	touch "$RUN_DIR/ready"
	log "ready: nspawn pid $(nspawn_pid), leader pid $(leader_pid)"
}

cmd_down() {
	local npid
	npid=$(nspawn_pid)
	if pid_is "$npid" systemd-nspawn; then
		log "stopping $MACHINE (nspawn pid $npid)"
		kill -TERM "$npid" 2>/dev/null || true
		local i
		for ((i = 0; i < 600; i++)); do
			pid_is "$npid" systemd-nspawn || break
			sleep 0.1
		done
		if pid_is "$npid" systemd-nspawn; then
			log "nspawn did not exit after 60s, killing"
			kill -KILL "$npid" 2>/dev/null || true
			# The container's PID namespace outlives a killed nspawn; killing its init ends it.
			if pid_is "$(leader_pid)" systemd; then kill -KILL "$(leader_pid)" 2>/dev/null || true; fi
			sleep 1
		fi
	fi
	cg_remove
	rm -rf "$RUN_DIR"
}

cmd_exec() {
	(($# > 0)) || die "usage: testhost.sh exec CMD [ARGS...]"
	is_running || die "test host is not running (run: $0 up)"
	local envs=(PATH="$GUEST_PATH" HOME=/root LANG=C.UTF-8) v
	[[ -n ${TERM:-} ]] && envs+=(TERM="$TERM")
	while IFS= read -r v; do
		envs+=("$v=${!v}")
	done < <(compgen -e | grep -E '^NIXOS_NSPAWN_' || true)
	# Keep the working directory when it exists inside too (the share is bound at the same path).
	local wd=/
	[[ -d /proc/$(leader_pid)/root$PWD ]] && wd=$PWD
	exec nsenter -t "$(leader_pid)" -a env -i -C "$wd" "${envs[@]}" "$@"
}

# One up/down at a time (parallel test runs share one test host).
lock() {
	exec {LOCK_FD}>/run/nomad-driver-nixos-testhost.lock
	flock "$LOCK_FD"
}

case ${1:-} in
up)
	lock
	cmd_up
	;;
down)
	lock
	cmd_down
	;;
status) is_ready ;;
rootfs)
	ensure_packages
	ensure_rootfs
	echo "$ROOTFS"
	;;
exec)
	shift
	cmd_exec "$@"
	;;
*)
	echo "usage: $0 {up|down|status|rootfs|exec CMD...}" >&2
	exit 2
	;;
esac

# shellcheck shell=bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# host.sh: what the test-host scripts share, sourced by e2e/testhost, e2e/cluster,
# e2e/fixtures and e2e/fresh. A "host" is a Debian systemd booted by systemd-nspawn;
# its state is a directory holding nspawn.pid, leader.pid and console.log.
# The caller sets LOG_TAG (the prefix of its messages) before sourcing.

GUEST_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "$LOG_TAG: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# Microseconds since the epoch, and the time since such a stamp as "1.2s".
now_us() { echo "${EPOCHREALTIME//[.,]/}"; }
since() {
	local d=$((($(now_us) - $1) / 100000))
	echo "$((d / 10)).$((d % 10))s"
}

# Install the Debian packages among "$@" that are missing, saying which.
ensure_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	log "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The machine's own Debian mirror, so debootstrap uses what apt can reach.
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

# cached_build DEST STAMP VERSION BUILD: make DEST with "BUILD TMPDIR" unless DEST/STAMP holds
# VERSION already. Builds are serialised by DEST's lock file (.NAME.lock beside it, which readers
# may hold shared) and swapped in whole, so a half-built tree never carries the stamp.
cached_build() {
	local dest=$1 stamp=$2 version=$3 build=$4 fd
	if [[ -f $dest/$stamp && $(cat "$dest/$stamp") == "$version" ]]; then return 0; fi
	local parent name
	parent=$(dirname "$dest") name=$(basename "$dest")
	mkdir -p "$parent"
	exec {fd}>"$parent/.$name.lock"
	flock "$fd"
	if [[ -f $dest/$stamp && $(cat "$dest/$stamp") == "$version" ]]; then
		exec {fd}>&-
		return 0
	fi
	local tmp=$parent/.$name.tmp.$$
	rm -rf "$tmp" "$parent/.$name".tmp.* "$parent/.$name.old"
	if ! "$build" "$tmp"; then
		rm -rf "$tmp"
		exec {fd}>&-
		die "building $dest failed"
	fi
	echo "$version" >"$tmp/$stamp"
	if [[ -e $dest ]]; then mv "$dest" "$parent/.$name.old"; fi
	mv "$tmp" "$dest"
	rm -rf "$parent/.$name.old"
	exec {fd}>&-
}

# debootstrap_tree DIR SUITE INCLUDE LOG [EXTRA...]: a minbase Debian SUITE with INCLUDE in DIR,
# then EXTRA installed by apt in a chroot (packages whose dependencies fail debootstrap's own
# configure pass); no apt caches or lists left in it.
debootstrap_tree() {
	local dir=$1 suite=$2 include=$3 logf=$4
	shift 4
	log "debootstrap $suite into $dir (a minute or more)"
	if ! debootstrap --variant=minbase --include="$include" "$suite" "$dir" "$(debian_mirror)" >"$logf" 2>&1; then
		tail -n 20 "$logf" >&2
		log "debootstrap failed (log: $logf)"
		return 1
	fi
	if (($# > 0)) && ! chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		"$@" >>"$logf" 2>&1; then
		tail -n 20 "$logf" >&2
		log "installing $* failed (log: $logf)"
		return 1
	fi
	rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
}

# One holder of FILE at a time; the descriptor stays in LOCK_FD, which booted hosts must not keep.
lock() {
	exec {LOCK_FD}>"$1"
	flock "$LOCK_FD"
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

host_nspawn_pid() { cat "$1/nspawn.pid" 2>/dev/null || true; }
host_leader_pid() { cat "$1/leader.pid" 2>/dev/null || true; }
host_running() { pid_is "$(host_nspawn_pid "$1")" systemd-nspawn && pid_is "$(host_leader_pid "$1")" systemd; }

# The cgroup NAME in each of "$@" (controllers and named hierarchies) the machine has.
cg_create() {
	local name=$1 c d
	shift
	for c in "$@"; do
		[[ -d /sys/fs/cgroup/$c ]] || continue
		d=/sys/fs/cgroup/$c/$name
		mkdir -p "$d"
		if [[ $c == cpuset ]]; then
			# A new cpuset cgroup starts empty and accepts no tasks until filled.
			cat /sys/fs/cgroup/cpuset/cpuset.cpus >"$d/cpuset.cpus"
			cat /sys/fs/cgroup/cpuset/cpuset.mems >"$d/cpuset.mems"
		fi
	done
}

# Kill what is left in cgroup NAME of each of "$@" (only once its host is gone), then rmdir
# depth-first: cgroup dirs cannot be removed with rm -r.
cg_remove() {
	local name=$1 c d pids i
	shift
	for c in "$@"; do
		d=/sys/fs/cgroup/$c/$name
		[[ -d $d ]] || continue
		for ((i = 0; i < 50; i++)); do
			pids=$(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null || true)
			[[ -z $pids ]] && break
			# shellcheck disable=SC2086 # one pid a word
			kill -KILL $pids 2>/dev/null || true
			sleep 0.1
		done
		find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
		[[ -d $d ]] && log "warning: could not remove $d"
	done
	return 0
}

# nspawn builds a host's systemd tree below the cgroup it starts in: each host starts in a cgroup
# NAME of its own in these hierarchies, so hosts on one machine stay out of each other's trees.
HOST_TREES=(systemd unified)

# The hosts share this machine's kernel, and every inotify instance of their machines counts
# against root's: the kernel's default of 128 holds fewer than 16 NixOS machines, 100 tiny ones barely.
HOST_INOTIFY_INSTANCES=8192

# host_start DIR CGROUP CONTROLLERS NSPAWN-ARGS...: boot a host in the background. CONTROLLERS
# (space-separated) are bound to /run/hostcg/<controller> for host_setup_cgroups.
host_start() {
	local dir=$1 cg=$2 controllers=$3 c
	shift 3
	local args=("$@")
	if (($(cat /proc/sys/fs/inotify/max_user_instances) < HOST_INOTIFY_INSTANCES)); then
		echo "$HOST_INOTIFY_INSTANCES" >/proc/sys/fs/inotify/max_user_instances
	fi
	# shellcheck disable=SC2086 # one controller a word
	cg_create "$cg" $controllers "${HOST_TREES[@]}"
	for c in $controllers; do
		[[ -d /sys/fs/cgroup/$c ]] || continue
		# Binds directly under /sys/fs/cgroup are hidden by nspawn's /sys mount.
		args+=(--bind="/sys/fs/cgroup/$c/$cg:/run/hostcg/$c")
	done
	mkdir -p "$dir"
	(
		# The host must not inherit (and so hold forever) the caller's lock.
		if [[ -n ${LOCK_FD:-} ]]; then exec {LOCK_FD}>&-; fi
		for c in "${HOST_TREES[@]}"; do
			if [[ -d /sys/fs/cgroup/$c/$cg ]]; then echo "$BASHPID" >"/sys/fs/cgroup/$c/$cg/cgroup.procs"; fi
		done
		exec setsid systemd-nspawn "${args[@]}" </dev/null >"$dir/console.log" 2>&1
	) &
	echo "$!" >"$dir/nspawn.pid"
}

# Run a command in a host with a clean environment.
host_guest() {
	local dir=$1
	shift
	nsenter -t "$(host_leader_pid "$dir")" -a env -i PATH="$GUEST_PATH" HOME=/root LANG=C.UTF-8 "$@"
}

host_wait_running() {
	local dir=$1 tries=$2 i
	for ((i = 0; i < tries; i++)); do
		case $(host_guest "$dir" systemctl is-system-running 2>/dev/null || true) in running | degraded) return 0 ;; esac
		pid_is "$(host_nspawn_pid "$dir")" systemd-nspawn || die "systemd-nspawn of the host in $dir exited"
		sleep 0.1
	done
	return 1
}

# host_wait_boot DIR NAME TIMEOUT: find the host's init and wait until its systemd is up.
host_wait_boot() {
	local dir=$1 name=$2 timeout=$3 npid lpid="" i
	npid=$(host_nspawn_pid "$dir")
	for ((i = 0; i < 200; i++)); do
		# comm reads "setsid" until the exec; only a vanished pid is fatal.
		alive "$npid" || {
			tail -n 30 "$dir/console.log" >&2
			die "systemd-nspawn of $name exited"
		}
		# The host's PID 1 ends up as the only child of the nspawn process.
		lpid=$(awk '{print $1}' "/proc/$npid/task/$npid/children" 2>/dev/null || true)
		if pid_is "$lpid" systemd; then break; fi
		lpid=""
		sleep 0.05
	done
	[[ -n $lpid ]] || die "no init found under nspawn pid $npid ($name)"
	echo "$lpid" >"$dir/leader.pid"
	host_wait_running "$dir" $((timeout * 10)) ||
		die "$name did not finish booting (state '$(host_guest "$dir" systemctl is-system-running 2>/dev/null)')"
}

# Give a booted host's systemd the real (writable) v1 controllers bound by host_start, so units get
# accounting and limits; freezer and cpuset (for Nomad's client) after the reexec, as systemd does
# not manage them on cgroup v1.
host_setup_cgroups() {
	local dir=$1
	# shellcheck disable=SC2016 # expanded by the host's shell
	host_guest "$dir" sh -c 'set -e
		for c in memory cpu cpuacct pids; do
			t=/sys/fs/cgroup/$c
			# cpu and cpuacct are separate hierarchies here but may be a joint mount elsewhere.
			if [ -L $t ]; then t=$(readlink -f $t); fi
			[ -d $t ] && [ -d /run/hostcg/$c ] || continue
			mount --bind /run/hostcg/$c $t
		done'
	# systemd probes controllers only at start; reexec makes it see the writable ones.
	host_guest "$dir" systemctl daemon-reexec
	# shellcheck disable=SC2016 # expanded by the host's shell
	host_guest "$dir" sh -c 'set -e
		for c in freezer cpuset; do
			[ -d /sys/fs/cgroup/$c ] && [ -d /run/hostcg/$c ] || continue
			mount --bind /run/hostcg/$c /sys/fs/cgroup/$c
		done'
	host_wait_running "$dir" 100 || true
}

# host_exec DIR CMD...: replace this shell with CMD in the host, its stdio and exit code passing
# through, with the caller's NIXOS_NSPAWN_* settings and, where the host has it too (shares are
# bound at the same path), its working directory.
host_exec() {
	local dir=$1 leader v
	shift
	leader=$(host_leader_pid "$dir")
	local envs=(PATH="$GUEST_PATH" HOME=/root LANG=C.UTF-8)
	[[ -n ${TERM:-} ]] && envs+=(TERM="$TERM")
	while IFS= read -r v; do
		envs+=("$v=${!v}")
	done < <(compgen -e | grep -E '^NIXOS_NSPAWN_' || true)
	local wd=/
	[[ -d /proc/$leader/root$PWD ]] && wd=$PWD
	exec nsenter -t "$leader" -a env -i -C "$wd" "${envs[@]}" "$@"
}

# stop_nspawn PID NAME SECONDS: SIGTERM (nspawn turns it into an orderly shutdown of the host and
# its machines), then SIGKILL after SECONDS.
stop_nspawn() {
	local pid=$1 name=$2 secs=$3 i
	pid_is "$pid" systemd-nspawn || return 0
	log "stopping $name (nspawn pid $pid)"
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < secs * 10; i++)); do
		pid_is "$pid" systemd-nspawn || return 0
		sleep 0.1
	done
	log "$name did not stop in ${secs}s; killing nspawn pid $pid"
	kill -KILL "$pid" 2>/dev/null || true
}

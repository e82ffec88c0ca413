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
LOG_TAG=testhost
# shellcheck source-path=SCRIPTDIR source=../lib/host.sh
. "$REPO_ROOT/e2e/lib/host.sh"

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
PACKAGES=(systemd-container debootstrap busybox-static nix-bin e2fsprogs util-linux iproute2)

# The host's tree, after debootstrap_tree.
customize_rootfs() {
	local tmp=$1 u
	debootstrap_tree "$tmp" "$SUITE" "$INCLUDE" "$CACHE_DIR/debootstrap.log" "${EXTRA_PACKAGES[@]}" || return 1
	echo nixos-testhost >"$tmp/etc/hostname"
	# The driver runs nix-store in here: Nix gets its settings from this file, not from defaults
	# that name a nixbld group Debian's nix-bin never creates.
	mkdir -p "$tmp/etc/nix"
	printf '%s\n' '# Written by e2e/testhost/testhost.sh.' 'build-users-group =' >"$tmp/etc/nix/nix.conf"
	: >"$tmp/etc/machine-id"
	# Units that only fail or wait for hardware inside a container.
	for u in systemd-networkd-wait-online.service getty@tty1.service console-getty.service \
		systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer; do
		ln -sf /dev/null "$tmp/etc/systemd/system/$u"
	done
}

# Build (cached) the rootfs; build.sh may ask for it while up runs, hence the lock in cached_build.
ensure_rootfs() { cached_build "$ROOTFS" .testhost-version "$ROOTFS_VERSION" customize_rootfs; }

is_running() { host_running "$RUN_DIR"; }
is_ready() { is_running && [[ -f $RUN_DIR/ready ]]; }
guest() { host_guest "$RUN_DIR" "$@"; }

boot() {
	rm -f "$RUN_DIR/ready"
	# The fixture closures (binary caches, export streams) are read where build.sh made them.
	mkdir -p "$CACHE_DIR/fixtures"
	# The fixtures' store appears inside even if it is populated after boot.
	mkdir -p /nix
	log "booting $MACHINE"
	host_start "$RUN_DIR" "$CG_NAME" "${CONTROLLERS[*]}" --register=no --keep-unit -D "$ROOTFS" -b \
		--capability=all -M "$MACHINE" --bind=/nix --bind="$SHARE_DIR:$SHARE_DIR" \
		--bind-ro="$CACHE_DIR/fixtures:$CACHE_DIR/fixtures"
	host_wait_boot "$RUN_DIR" "$MACHINE" "$BOOT_TIMEOUT"
	log "booted"
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
	ensure_packages "${PACKAGES[@]}"
	ensure_rootfs
	boot
	host_setup_cgroups "$RUN_DIR"
	verify
	echo "$SHARE_DIR" >"$RUN_DIR/share"
	touch "$RUN_DIR/ready"
	log "ready: nspawn pid $(host_nspawn_pid "$RUN_DIR"), leader pid $(host_leader_pid "$RUN_DIR")"
}

cmd_down() {
	stop_nspawn "$(host_nspawn_pid "$RUN_DIR")" "$MACHINE" 60
	# The container's PID namespace outlives a killed nspawn; killing its init ends it.
	if pid_is "$(host_leader_pid "$RUN_DIR")" systemd; then kill -KILL "$(host_leader_pid "$RUN_DIR")" 2>/dev/null || true; fi
	cg_remove "$CG_NAME" "${CONTROLLERS[@]}" "${HOST_TREES[@]}"
	rm -rf "$RUN_DIR"
}

case ${1:-} in
up)
	lock /run/nomad-driver-nixos-testhost.lock
	cmd_up
	;;
down)
	lock /run/nomad-driver-nixos-testhost.lock
	cmd_down
	;;
status) is_ready ;;
rootfs)
	ensure_packages "${PACKAGES[@]}"
	ensure_rootfs
	echo "$ROOTFS"
	;;
exec)
	shift
	(($# > 0)) || die "usage: testhost.sh exec CMD [ARGS...]"
	is_running || die "test host is not running (run: $0 up)"
	host_exec "$RUN_DIR" "$@"
	;;
*)
	echo "usage: $0 {up|down|status|rootfs|exec CMD...}" >&2
	exit 2
	;;
esac

#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# vmhost.sh: a Debian systemd host in a QEMU virtual machine, with a kernel of its own on the
# unified cgroup v2 hierarchy with every controller, which no container on a hybrid build
# machine can have. QEMU runs with TCG (nested KVM does not work here), about 20-30 times slower
# than native: boot takes about two minutes. Its console log outlives it in
# /var/log/nomad-driver-nixos-vmhost.console.log (or -INSTANCE.console.log).
#
#   vmhost.sh up        build (cached) and boot the VM; idempotent
#   vmhost.sh exec CMD  run CMD in it over SSH (stdio and exit code pass through, with the
#                       caller's NIXOS_NSPAWN_* variables and working directory)
#   vmhost.sh down      stop it; nothing is left running or mounted; idempotent
#   vmhost.sh status    exit 0 if it is running and set up
#
# Everything in it comes from Debian's archive: a debootstrapped tree (NIXOS_NSPAWN_VM_SUITE,
# default trixie: systemd 257) with Debian's kernel and initramfs. The checkout and the cache
# directory (fixtures, the Nomad agent) appear read-only at the same paths as here, over virtio-9p; the
# closures of the fixture toplevels named in fixtures.env are in the VM's own Nix store, on a
# second disk. Both disks are cached images the VM never writes to (QEMU's -snapshot).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
LOG_TAG=vmhost
# shellcheck source-path=SCRIPTDIR source=../lib/host.sh
. "$REPO_ROOT/e2e/lib/host.sh"

CACHE_DIR=${NIXOS_NSPAWN_CACHE:-/var/cache/nomad-driver-nixos}
SHARE_DIR=${NIXOS_NSPAWN_SHARE:-$REPO_ROOT}
FIXTURES_ENV=$CACHE_DIR/fixtures.env
SUITE=${NIXOS_NSPAWN_VM_SUITE:-trixie}
INSTANCE=${NIXOS_NSPAWN_INSTANCE:+-$NIXOS_NSPAWN_INSTANCE}
RUN_DIR=/run/nomad-driver-nixos-vmhost$INSTANCE
CONSOLE_KEPT=/var/log/nomad-driver-nixos-vmhost$INSTANCE.console.log
IMAGE_DIR=$CACHE_DIR/vmhost-$SUITE
NIX_DIR=$CACHE_DIR/vmhost-nix
BOOT_TIMEOUT=${NIXOS_NSPAWN_VM_BOOT_TIMEOUT:-600}
VM_MEMORY=${NIXOS_NSPAWN_VM_MEMORY:-3072}
# containernetworking-plugins and iptables: Nomad's bridge mode (the CNI reference plugins, whose
# firewall and portmap plugins drive iptables).
INCLUDE=systemd,systemd-sysv,dbus,systemd-container,iproute2,nftables,e2fsprogs,util-linux,procps,kmod,linux-image-amd64,openssh-server,containernetworking-plugins,iptables
EXTRA_PACKAGES=(nix-bin)
# Bump when the image recipe (below) changes; the stamp mismatch forces a rebuild.
IMAGE_VERSION="v1 $SUITE minbase $INCLUDE ${EXTRA_PACKAGES[*]}"
PACKAGES=(qemu-system-x86 debootstrap e2fsprogs openssh-client nix-bin)
# The guest's one NIC, on QEMU's user-mode network (slirp); SSH comes in through a host port.
GUEST_NET="10.0.2.15/24 via 10.0.2.2"

# ---------------------------------------------------------------- images

# The root image: the debootstrapped tree with the settings a test host needs, written into an
# ext4 image without mounting anything, and the kernel and initramfs Debian made for it.
build_image() {
	local out=$1 root=$1/rootfs
	mkdir -p "$out"
	debootstrap_tree "$root" "$SUITE" "$INCLUDE" "$CACHE_DIR/vmhost-debootstrap.log" "${EXTRA_PACKAGES[@]}" || return 1
	cp "$root"/boot/vmlinuz-* "$out/vmlinuz"
	cp "$root"/boot/initrd.img-* "$out/initrd.img" || {
		log "Debian's kernel package made no initramfs in $root/boot"
		return 1
	}
	echo nixos-vmhost >"$root/etc/hostname"
	: >"$root/etc/machine-id"
	printf '%s\n' '/dev/vda / ext4 rw 0 0' '/dev/vdb /nix ext4 rw 0 0' >"$root/etc/fstab"
	mkdir -p "$root/etc/nix"
	printf '%s\n' '# Written by e2e/vmhost/vmhost.sh.' 'build-users-group =' >"$root/etc/nix/nix.conf"
	# A fixed address on the user-mode network; no networkd, as on the container test host.
	cat >"$root/etc/systemd/system/vmhost-net.service" <<-EOF
		[Unit]
		Description=Address of the VM on QEMU's user-mode network
		Before=network.target ssh.service
		[Service]
		Type=oneshot
		RemainAfterExit=yes
		ExecStart=/usr/sbin/ip link set lo up
		ExecStart=/usr/sbin/ip link set eth0 up
		ExecStart=/usr/sbin/ip addr add ${GUEST_NET% via *} dev eth0
		ExecStart=/usr/sbin/ip route add default via ${GUEST_NET#* via }
		[Install]
		WantedBy=multi-user.target
	EOF
	ln -sf ../vmhost-net.service "$root/etc/systemd/system/multi-user.target.wants/vmhost-net.service"
	local u
	for u in systemd-networkd-wait-online.service systemd-timesyncd.service apt-daily.timer \
		apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
		ln -sf /dev/null "$root/etc/systemd/system/$u"
	done
	ssh-keygen -q -t ed25519 -N '' -C vmhost -f "$out/ssh_key"
	mkdir -p "$root/root/.ssh"
	chmod 0700 "$root/root/.ssh"
	cp "$out/ssh_key.pub" "$root/root/.ssh/authorized_keys"
	# Room for the tests' data directories beyond the tree itself; the file is sparse.
	truncate -s 6G "$out/root.img"
	mke2fs -q -t ext4 -d "$root" "$out/root.img"
	rm -rf "$root"
}

# The fixture toplevels named in fixtures.env.
fixture_toplevels() {
	local line
	while IFS= read -r line; do
		[[ $line =~ ^NIXOS_NSPAWN_[A-Z0-9_]+_TOPLEVEL=(/nix/store/.+)$ ]] && echo "${BASH_REMATCH[1]}"
	done <"$FIXTURES_ENV"
}

nix_env() { env NIX_CONFIG='build-users-group =' "$@"; }

# The Nix image, mounted at /nix: the closures of the fixtures, registered in a Nix database of
# their own.
build_nix_image() {
	local out=$1 stage=$1/stage paths
	mkdir -p "$stage/store" "$stage/var/nix"
	mapfile -t paths < <(fixture_closure)
	((${#paths[@]} > 0)) || return 1
	cp -a "${paths[@]}" "$stage/store/"
	nix_env nix-store --dump-db "${paths[@]}" | NIX_STATE_DIR=$stage/var/nix nix_env nix-store --load-db || return 1
	[[ -s $stage/var/nix/db/db.sqlite ]] || return 1
	local kib
	kib=$(du -sk "$stage" | cut -f1)
	truncate -s $(((kib + 1024 * 1024) * 1024)) "$out/nix.img"
	mke2fs -q -t ext4 -d "$stage" "$out/nix.img"
	rm -rf "$stage"
}

fixture_closure() { fixture_toplevels | xargs env NIX_CONFIG='build-users-group =' nix-store -qR | sort -u; }
# Bump the v when the Nix image recipe changes.
nix_version() { echo "v2 $(fixture_closure | sha256sum | cut -c1-16)"; }

# ---------------------------------------------------------------- the VM

qemu_pid() { cat "$RUN_DIR/qemu.pid" 2>/dev/null || true; }
is_running() { pid_is "$(qemu_pid)" qemu-system-x86; }
is_ready() { is_running && [[ -f $RUN_DIR/ready ]]; }

ssh_args() {
	echo -i "$IMAGE_DIR/ssh_key" -p "$(cat "$RUN_DIR/port")" -o BatchMode=yes -o LogLevel=ERROR \
		-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 \
		-o ControlMaster=auto -o ControlPath="$RUN_DIR/ssh.ctl" -o ControlPersist=yes
}

# guest CMD...: a command line for the guest's shell, without the caller's environment. The
# connection master that the first call leaves behind must not hold our lock.
guest() {
	# shellcheck disable=SC2046 # one option a word
	ssh $(ssh_args) -T root@127.0.0.1 "$@" </dev/null {LOCK_FD}>&-
}

boot() {
	local port i
	rm -rf "$RUN_DIR"
	mkdir -p "$RUN_DIR"
	# A port free now; QEMU refuses to start if it is taken by then, and another is tried.
	for ((i = 0; i < 20; i++)); do
		port=$((20000 + RANDOM % 20000))
		(: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null && continue
		echo "$port" >"$RUN_DIR/port"
		# One host thread for both vCPUs: with a thread each (MTTCG), the guest kernel died now and
		# then under the cgroup tests ("Oops: int3" in the scheduler, in 2 of 4 CI runs) while the
		# same tests passed on a rerun; MTTCG's handling of code one vCPU changes while another
		# runs it is its known weak spot, and the Linux kernel patches its own code at run time.
		if qemu-system-x86_64 -name "nixos-vmhost$INSTANCE" -accel tcg,thread=single -smp 2 -m "$VM_MEMORY" \
			-display none -monitor none -serial "file:$RUN_DIR/console.log" -no-reboot \
			-kernel "$IMAGE_DIR/vmlinuz" -initrd "$IMAGE_DIR/initrd.img" \
			-append "console=ttyS0 root=/dev/vda rw panic=-1 net.ifnames=0 systemd.unified_cgroup_hierarchy=1" \
			-snapshot -drive "file=$IMAGE_DIR/root.img,if=virtio,format=raw" \
			-drive "file=$NIX_DIR/nix.img,if=virtio,format=raw" \
			-nic "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:$port-:22" \
			-virtfs "local,path=$SHARE_DIR,mount_tag=repo,security_model=none,readonly=on" \
			-virtfs "local,path=$CACHE_DIR,mount_tag=cache,security_model=none,readonly=on" \
			-daemonize -pidfile "$RUN_DIR/qemu.pid" 2>"$RUN_DIR/qemu.err" {LOCK_FD}>&-; then
			return 0
		fi
		grep -q 'hostfwd' "$RUN_DIR/qemu.err" || die "qemu failed: $(cat "$RUN_DIR/qemu.err")"
	done
	die "no free port for the VM's SSH after 20 tries"
}

wait_boot() {
	local start=$1 state
	while :; do
		is_running || {
			show_console
			die "the VM exited while booting"
		}
		(($(now_us) - start < BOOT_TIMEOUT * 1000000)) || {
			show_console
			die "the VM did not boot within ${BOOT_TIMEOUT}s (NIXOS_NSPAWN_VM_BOOT_TIMEOUT)"
		}
		state=$(guest systemctl is-system-running 2>/dev/null || true)
		case $state in running | degraded) return 0 ;; esac
		sleep 2
	done
}

# The shares at the paths they have here, and checks that this is the host the tests need.
setup() {
	guest "set -e; modprobe 9pnet_virtio
		mkdir -p $(printf %q "$SHARE_DIR") $(printf %q "$CACHE_DIR")
		mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 repo $(printf %q "$SHARE_DIR")
		mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 cache $(printf %q "$CACHE_DIR")"
	[[ $(guest stat -fc %T /sys/fs/cgroup) == cgroup2fs ]] || die "the VM's /sys/fs/cgroup is not cgroup v2"
	local c controllers
	controllers=$(guest cat /sys/fs/cgroup/cgroup.controllers)
	for c in cpuset cpu io memory pids; do
		[[ " $controllers " == *" $c "* ]] || die "the VM's cgroup v2 lacks the $c controller ($controllers)"
	done
	guest machinectl list --no-legend >/dev/null || die "machinectl does not work in the VM"
	guest nix-store --check-validity "$(fixture_toplevels | head -n1)" || die "the fixtures are not valid in the VM's Nix store"
	log "systemd $(guest systemctl --version | awk 'NR==1{print $2}'), kernel $(guest uname -r), controllers: $controllers"
}

cmd_up() {
	if is_ready && [[ $(cat "$RUN_DIR/share" 2>/dev/null) == "$SHARE_DIR" ]]; then return 0; fi
	if is_running || [[ -d $RUN_DIR ]]; then cmd_down; fi
	[[ -f $FIXTURES_ENV ]] || die "no $FIXTURES_ENV: build the fixtures first (e2e/fixtures/build.sh)"
	ensure_packages "${PACKAGES[@]}"
	local t
	t=$(now_us)
	cached_build "$IMAGE_DIR" .version "$IMAGE_VERSION" build_image
	cached_build "$NIX_DIR" .version "$(nix_version)" build_nix_image
	log "images ready in $(since "$t")"
	t=$(now_us)
	boot
	log "booting nixos-vmhost$INSTANCE (QEMU pid $(qemu_pid), SSH on port $(cat "$RUN_DIR/port"))"
	wait_boot "$t"
	log "booted in $(since "$t")"
	setup
	echo "$SHARE_DIR" >"$RUN_DIR/share"
	touch "$RUN_DIR/ready"
}

cmd_down() {
	local pid i
	if [[ -S $RUN_DIR/ssh.ctl ]]; then
		# shellcheck disable=SC2046 # one option a word
		ssh $(ssh_args) -O exit root@127.0.0.1 2>/dev/null || true
	fi
	pid=$(qemu_pid)
	[[ -s $RUN_DIR/console.log ]] && cp "$RUN_DIR/console.log" "$CONSOLE_KEPT"
	if pid_is "$pid" qemu-system-x86; then
		# Both disks are -snapshot: nothing in the VM outlives it, so no orderly shutdown is owed.
		log "stopping nixos-vmhost$INSTANCE (QEMU pid $pid)"
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			pid_is "$pid" qemu-system-x86 || break
			sleep 0.1
		done
		if pid_is "$pid" qemu-system-x86; then kill -KILL "$pid" 2>/dev/null || true; fi
	fi
	rm -rf "$RUN_DIR"
}

# show_console: keeps the VM's console log and shows the guest kernel's first oops or panic
# report in it, or else its last lines.
show_console() {
	local first
	[[ -s $RUN_DIR/console.log ]] || return 0
	cp "$RUN_DIR/console.log" "$CONSOLE_KEPT"
	first=$(grep -n -m1 -E 'cut here|Oops|BUG:|Kernel panic' "$CONSOLE_KEPT" | cut -d: -f1 || true)
	if [[ -n $first ]]; then
		log "the VM's console from its first kernel error on (all of it: $CONSOLE_KEPT):"
		tail -n +"$first" "$CONSOLE_KEPT" | head -n 150 >&2
	else
		log "the last lines of the VM's console (all of it: $CONSOLE_KEPT):"
		tail -n 40 "$CONSOLE_KEPT" >&2
	fi
}

# exec CMD...: CMD in the VM, in the caller's directory when the shared checkout has it.
cmd_exec() {
	local wd=/ v remote
	[[ $PWD == "$SHARE_DIR" || $PWD == "$SHARE_DIR"/* || $PWD == "$CACHE_DIR" || $PWD == "$CACHE_DIR"/* ]] && wd=$PWD
	remote="cd $(printf %q "$wd") && exec env"
	while IFS= read -r v; do
		remote+=" $(printf %q "$v=${!v}")"
	done < <(compgen -e | grep -E '^NIXOS_NSPAWN_' || true)
	remote+=" $(printf '%q ' "$@")"
	local tty=-T
	[[ -t 0 && -t 1 ]] && tty=-t
	# shellcheck disable=SC2046 # one option a word
	exec ssh $(ssh_args) "$tty" root@127.0.0.1 "$remote"
}

case ${1:-} in
up)
	lock "/run/nomad-driver-nixos-vmhost$INSTANCE.lock"
	cmd_up
	;;
down)
	lock "/run/nomad-driver-nixos-vmhost$INSTANCE.lock"
	cmd_down
	;;
status) is_ready ;;
exec)
	shift
	(($# > 0)) || die "usage: vmhost.sh exec CMD [ARGS...]"
	if ! is_ready; then
		# A VM that ended under a test (a guest kernel panic powers it off) leaves its console.
		show_console
		die "the VM host is not running (run: $0 up)"
	fi
	cmd_exec "$@"
	;;
*)
	echo "usage: $0 {up|down|status|exec CMD...}" >&2
	exit 2
	;;
esac

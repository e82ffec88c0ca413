#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# fresh-machine.sh: the README's two commands on a machine state like a new one, timed cold and
# warm. A Debian 12 tree is debootstrapped with what a new machine of this kind has (Debian's
# systemd, build-essential, git, ca-certificates...; no nix-bin, debootstrap, systemd-container,
# chromium, no nixbld group, no /etc/nix, no /var/cache/nomad-driver-nixos), given the build
# machine's /usr/local/go (read-only), Node.js and npm, apt sources and resolv.conf, and a fresh
# clone of this checkout's HEAD. In it, as root, run in order:
#   make demo; make demo-stop; make test        (cold: every cache is empty and inside the tree)
#   make demo; make demo-stop; make test        (warm)
# then the test hosts are stopped. The tree runs in namespaces of its own, so it shares nothing
# with test hosts already on the machine: a network namespace reaching the registries through
# slirp4netns (user-mode NAT: no address, route, sysctl or firewall rule changes on the machine),
# a PID namespace (whatever is left dies with it), a mount namespace (proc, sys, dev, a fresh
# /run; every mount goes with it) and NIXOS_NSPAWN_INSTANCE=fresh (the only names the machine
# sees, its cgroups, get their own suffix).
#
#   fresh-machine.sh run    all of the above; the timings go to $FRESH_DIR/times, logs next to it
#   fresh-machine.sh down   stop and remove what a run left (namespace, slirp4netns, cgroups, tree)
#
#   NIXOS_NSPAWN_FRESH_DIR     where the tree and logs go (default /var/tmp/nomad-driver-nixos-fresh)
#   NIXOS_NSPAWN_FRESH_PASSES  which passes to run (default "cold warm"; "cold" alone proves the
#                              setup and saves the warm pass's half hour)
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FRESH_DIR=${NIXOS_NSPAWN_FRESH_DIR:-/var/tmp/nomad-driver-nixos-fresh}
ROOT=$FRESH_DIR/root
LOGS=$FRESH_DIR/logs
NETNS=nxfresh
INSTANCE=fresh
PASSES=${NIXOS_NSPAWN_FRESH_PASSES:-cold warm}
# The clone's place inside the tree.
CHECKOUT=/root/nomad-driver-nixos
# What a new machine of this kind has (installed-go.txt) that the project's scripts may touch.
INCLUDE=build-essential,git,ca-certificates,curl,wget,xz-utils,zstd,bzip2,unzip,procps,iproute2,python3,file,gnupg,less,patch,openssl,dbus,systemd,systemd-sysv,hostname
LOG_TAG=fresh
# shellcheck source-path=SCRIPTDIR source=../lib/host.sh
. "$REPO_ROOT/e2e/lib/host.sh"
TREE_PATH=/usr/local/go/bin:$GUEST_PATH

# The debootstrapped image, kept as a tarball between runs: it is the new machine before anything
# of the project touched it (debootstrap alone takes over ten minutes here).
make_image() {
	local image
	image=$FRESH_DIR/image-$(echo "bookworm $INCLUDE" | sha256sum | cut -c1-12).tar
	if [[ ! -f $image ]]; then
		log "debootstrap bookworm (over ten minutes; kept as $image)"
		rm -rf "$FRESH_DIR/image.tmp" "$FRESH_DIR"/image-*.tar
		debootstrap --include="$INCLUDE" bookworm "$FRESH_DIR/image.tmp" "$(debian_mirror)" >"$LOGS/debootstrap.log" 2>&1 ||
			{ tail -n 20 "$LOGS/debootstrap.log" >&2; die "debootstrap failed"; }
		tar -C "$FRESH_DIR/image.tmp" --xattrs --xattrs-include='*' -cf "$image.tmp" .
		mv "$image.tmp" "$image"
		rm -rf "$FRESH_DIR/image.tmp"
	fi
	mkdir -p "$ROOT"
	tar -C "$ROOT" --xattrs --xattrs-include='*' -xf "$image"
}

make_tree() {
	make_image
	# The machine's TLS trust: this workplace's egress goes through a proxy with CAs of its own,
	# which every new machine of this kind has in its bundle.
	mkdir -p "$ROOT/usr/local/share/ca-certificates"
	cp -a /usr/local/share/ca-certificates/. "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
	cp -a /etc/ssl/certs/. "$ROOT/etc/ssl/certs/"
	# The build machine's apt setup, as a new machine of this kind has it.
	rm -f "$ROOT"/etc/apt/sources.list
	cp -a /etc/apt/sources.list.d/. "$ROOT/etc/apt/sources.list.d/"
	cp -a /etc/apt/apt.conf.d/. "$ROOT/etc/apt/apt.conf.d/"
	cp -a /usr/share/keyrings/. "$ROOT/usr/share/keyrings/"
	cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
	printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
	# Node.js and npm at /usr/bin as on a new machine (from the build machine: the new
	# machine's own come from a source this network does not reach).
	cp /usr/bin/node "$ROOT/usr/bin/node"
	mkdir -p "$ROOT/usr/lib/node_modules"
	cp -a "$(readlink -f /usr/lib/node_modules/npm)" "$ROOT/usr/lib/node_modules/npm"
	ln -sf ../lib/node_modules/npm/bin/npm-cli.js "$ROOT/usr/bin/npm"
	ln -sf ../lib/node_modules/npm/bin/npx-cli.js "$ROOT/usr/bin/npx"
	mkdir -p "$ROOT/usr/local/go"
	git clone -q "$REPO_ROOT" "$ROOT$CHECKOUT"
	git -C "$ROOT$CHECKOUT" checkout -q --detach "$(git -C "$REPO_ROOT" rev-parse HEAD)"
}

# The commands, run inside the tree; each line of $FRESH_DIR/times is "<step> <seconds> <result>".
write_steps() {
	cat >"$ROOT/fresh-steps.sh" <<-'EOF'
		set -uo pipefail
		cd "$1"
		step() {
			local name=$1 t0=$SECONDS rc=0
			shift
			echo "== $name: $* ($(date -u +%T))"
			"$@" >"/fresh-logs/$name.log" 2>&1 || rc=$?
			echo "$name $((SECONDS - t0)) $( ((rc == 0)) && echo ok || echo "failed($rc)")" | tee -a /fresh-logs/times
			if ((rc != 0)); then
				tail -n 40 "/fresh-logs/$name.log"
				cp /run/nomad-driver-nixos-testhost/console.log "/fresh-logs/$name.testhost-console.log" 2>/dev/null
			fi
			return "$rc"
		}
		rc=0
		for pass in $2; do
			step "$pass-demo" make demo && step "$pass-demo-stop" make demo-stop && step "$pass-test" make test || { rc=1; break; }
		done
		e2e/cluster/cluster.sh down >/dev/null 2>&1
		make testhost-down >/dev/null 2>&1
		exit "$rc"
	EOF
}

net_up() {
	ip netns add "$NETNS"
	ip -n "$NETNS" link set lo up
	# --disable-host-loopback: the tree cannot reach the machine's own 127.0.0.1 (the shared agent).
	setsid slirp4netns --configure --mtu=65520 --disable-host-loopback \
		--netns-type=path "/run/netns/$NETNS" tap0 </dev/null >"$LOGS/slirp4netns.log" 2>&1 &
	echo "$!" >"$FRESH_DIR/slirp4netns.pid"
	local i
	for ((i = 0; i < 50; i++)); do
		ip -n "$NETNS" route show default | grep -q tap0 && return 0
		sleep 0.1
	done
	die "slirp4netns did not configure tap0 (log: $LOGS/slirp4netns.log)"
}

# Mount what the tree needs inside new mount and PID namespaces, make it their root, and run the steps; the
# namespaces (and so every mount and process) end with the steps.
run_inside() {
	nsenter --net="/run/netns/$NETNS" unshare --mount --pid --fork --propagation private \
		bash -s "$ROOT" "$LOGS" "$CHECKOUT" "$TREE_PATH" "$INSTANCE" "$PASSES" <<-'EOF'
			set -euo pipefail
			root=$1 logs=$2 checkout=$3 path=$4 instance=$5 passes=$6
			# A mount point of its own, to become / (pivot_root below): systemd-nspawn makes / a
			# slave mount and fails with EINVAL where / is a plain directory.
			mount --bind "$root" "$root"
			mount -t proc proc "$root/proc"
			# sysfs of this network namespace, with the machine's cgroup hierarchies under it.
			mount -t sysfs sysfs "$root/sys"
			mount --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"
			mount --rbind /dev "$root/dev"
			mount -t tmpfs -o mode=0755 tmpfs "$root/run"
			mount --bind /usr/local/go "$root/usr/local/go"
			mount -o remount,bind,ro "$root/usr/local/go"
			mkdir -p "$root/fresh-logs" "$root/.old-root"
			mount --bind "$logs" "$root/fresh-logs"
			# The tree becomes this mount namespace's root, as / is a machine's: nsenter -a (how
			# the scripts enter a test host) finds a machine's root by the namespace's root, which
			# a chroot would leave at the build machine's /.
			cd "$root"
			pivot_root . .old-root
			umount -l /.old-root
			rmdir /.old-root
			# The machine's environment as CI gets it, AWS_CA_BUNDLE included.
			exec /usr/sbin/chroot / /usr/bin/env -i PATH="$path" HOME=/root LANG=C.UTF-8 TERM=dumb CI=true \
				AWS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt NIXOS_NSPAWN_INSTANCE="$instance" \
				bash /fresh-steps.sh "$checkout" "$passes"
		EOF
}

# The cgroups the tree's test hosts and agents made, by the instance suffix of their names.
instance_cg_remove() {
	local d
	for d in /sys/fs/cgroup/*/*-"$INSTANCE"; do
		[[ -d $d ]] || continue
		case ${d##*/} in nixos-nspawn-* | nomad-e2e-agent-*) ;; *) continue ;; esac
		cg_remove "${d##*/}" "$(basename "$(dirname "$d")")"
	done
}

cmd_down() {
	local pid
	pid=$(cat "$FRESH_DIR/slirp4netns.pid" 2>/dev/null || true)
	if [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == slirp4netns ]]; then kill "$pid"; fi
	rm -f "$FRESH_DIR/slirp4netns.pid"
	if [[ -e /run/netns/$NETNS ]]; then ip netns del "$NETNS"; fi
	instance_cg_remove
	if [[ -d $ROOT ]]; then
		# Files the driver made immutable (chattr +i) refuse rm until cleared.
		rm -rf --one-file-system "$ROOT" 2>/dev/null || {
			chattr -R -i "$ROOT" 2>/dev/null || true
			rm -rf --one-file-system "$ROOT"
		}
	fi
}

cmd_run() {
	((EUID == 0)) || die "run as root"
	# The harness's own tools, on the build machine (not in the tree).
	ensure_packages debootstrap slirp4netns
	cmd_down
	rm -rf "$LOGS"
	mkdir -p "$LOGS"
	local t0=$SECONDS rc=0
	make_tree
	log "tree ready in $((SECONDS - t0))s"
	write_steps
	net_up
	run_inside || rc=$?
	cmd_down
	log "timings (seconds):"
	cat "$LOGS/times" >&2
	return "$rc"
}

case ${1:-} in
run) cmd_run ;;
down) cmd_down ;;
*)
	echo "usage: $0 {run|down}" >&2
	exit 2
	;;
esac

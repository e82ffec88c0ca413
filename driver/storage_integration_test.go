// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"

	"github.com/nomad-nixos/nomad-driver-nixos/cgroupfs"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// guestExec runs cmd in the machine as a guest service (systemd-run inside it) and returns its
// exit code and output.
func guestExec(t *testing.T, td *testDriver, cfg *drivers.TaskConfig, cmd ...string) (int, string, string) {
	t.Helper()
	res, err := td.ExecTask(cfg.ID, cmd, scaled(time.Minute))
	must.NoError(t, err)
	return res.ExitResult.ExitCode, string(res.Stdout), string(res.Stderr)
}

// A file of the task's secrets directory named in credentials reaches a guest service through
// LoadCredential=, readable by that service's user alone, and lands nowhere else: not in the
// machine's root, the console, the unit or the host's journal. Destroying the task removes the
// staged copy.
// It runs with guests of systemd 252 and 257 (NixOS 25.05's).
func TestCredentials(t *testing.T) {
	for _, g := range guests(t) {
		t.Run(g.name, func(t *testing.T) { credentials(t, g.toplevel) })
	}
}

type guest struct{ name, toplevel string }

func guests(t *testing.T) []guest {
	return []guest{{"systemd 252", systemdToplevel(t)}, {"systemd 257", fixture(t, "NIXOS_NSPAWN_SYSTEMD257_TOPLEVEL")}}
}

func credentials(t *testing.T, toplevel string) {
	td := newTestDriver(t, "")
	const secret = "s3cr3t-credential-value-8d1f"
	since := time.Now()
	cfg := td.newTask(t, "creds", toplevel, nil, withConfig(func(tc *TaskConfig) {
		tc.Credentials = []map[string]string{{"db-password": "secrets/db-password", "api.token": "tokens/api"}}
	}))
	secrets := cfg.TaskDir().SecretsDir
	// As a template with perms = "0600" renders it.
	must.NoError(t, os.WriteFile(filepath.Join(secrets, "db-password"), []byte(secret), 0o600))
	must.NoError(t, os.Mkdir(filepath.Join(secrets, "tokens"), 0o700))
	must.NoError(t, os.WriteFile(filepath.Join(secrets, "tokens", "api"), []byte("token-2"), 0o600))
	td.start(t, cfg)
	waitLog(t, cfg, "longrun: started", 2*time.Minute)
	machine := machineOf(t, cfg)

	code, out, errOut := guestExec(t, td, cfg, "systemd-run", "--quiet", "--wait", "--pipe",
		"-p", "LoadCredential=db-password", "-p", "LoadCredential=api.token", "-p", "User=www-data",
		"/bin/sh", "-c", `cd "$CREDENTIALS_DIRECTORY" && stat -c '%n %a %U' db-password api.token && cat db-password && echo && cat api.token`)
	must.Eq(t, 0, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	must.Eq(t, "db-password 400 www-data\napi.token 400 www-data\n"+secret+"\ntoken-2", out)

	// Another service without LoadCredential= reads it neither from the system credentials nor
	// from /secrets (the template's 0600 file is host root's, nobody's in the machine).
	code, out, errOut = guestExec(t, td, cfg, "systemd-run", "--quiet", "--wait", "--pipe", "-p", "User=www-data",
		"/bin/sh", "-c", "cat /run/credentials/@system/db-password; cat /secrets/db-password; exit 0")
	must.Eq(t, 0, code)
	must.StrNotContains(t, out, secret)
	must.StrContains(t, errOut, "/run/credentials/@system/db-password: Permission denied")
	must.StrContains(t, errOut, "/secrets/db-password: Permission denied")

	// A service asking for a credential the task does not give starts without it: systemd skips
	// a system credential that is not there.
	code, out, errOut = guestExec(t, td, cfg, "systemd-run", "--quiet", "--wait", "--pipe", "-p", "LoadCredential=not-given",
		"/bin/sh", "-c", `test ! -e "$CREDENTIALS_DIRECTORY/not-given" && echo started without it`)
	must.Eq(t, 0, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	must.Eq(t, "started without it\n", out)

	// The staged copy is root's alone, on a tmpfs.
	stage := filepath.Join(credentialsRunDir, machine)
	fi, err := os.Stat(stage)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o700), fi.Mode().Perm())
	fi, err = os.Stat(filepath.Join(stage, "db-password"))
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o400), fi.Mode().Perm())
	var st unix.Statfs_t
	must.NoError(t, unix.Statfs(stage, &st))
	must.Eq(t, int64(unix.TMPFS_MAGIC), int64(st.Type), must.Sprint("the staged credentials are not on a tmpfs"))

	// Nowhere else: the machine's directory (its root, console log, state), the unit, the
	// transient unit file and the host's journal.
	must.NoError(t, filepath.WalkDir(td.machineDir(t, cfg), func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), secret) {
			t.Errorf("the secret is in %s", p)
		}
		return nil
	}))
	must.StrNotContains(t, run(t, "systemctl", "show", machine+".service"), secret)
	must.StrNotContains(t, run(t, "journalctl", "--no-pager", "-o", "cat", "--since", since.Format("2006-01-02 15:04:05")), secret)
	if b, err := os.ReadFile("/run/systemd/transient/" + machine + ".service"); err == nil {
		must.StrNotContains(t, string(b), secret)
	}
	must.StrNotContains(t, logs(t, cfg), secret)

	must.NoError(t, td.d.DestroyTask(cfg.ID, true))
	_, err = os.Stat(stage)
	must.True(t, os.IsNotExist(err), must.Sprintf("%s is still there after destroy", stage))
}

// A credential whose file is missing, is a link out of the secrets directory or is no regular
// file fails the start with the name and the file, and leaves nothing behind.
func TestCredentialRefusalsLeaveNothing(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	before := inventory(t, dataDir)
	outside := filepath.Join(t.TempDir(), "host-file")
	must.NoError(t, os.WriteFile(outside, []byte("host only"), 0o600))
	for _, c := range []struct {
		name, file, want string
		prepare          func(secrets string)
	}{
		{"missing file", "db-password", `credential "db" from "db-password": no such file`, nil},
		{"link out of the secrets directory", "escape", `credential "db" from "escape"`, func(secrets string) {
			must.NoError(t, os.Symlink(outside, filepath.Join(secrets, "escape")))
		}},
		{"a directory", "dir", `credential "db" from "dir": not a regular file`, func(secrets string) {
			must.NoError(t, os.Mkdir(filepath.Join(secrets, "dir"), 0o700))
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := td.newTask(t, "badcred", tinyToplevel(t), nil, withConfig(func(tc *TaskConfig) {
				tc.Credentials = []map[string]string{{"ok": "fine", "db": c.file}}
			}))
			must.NoError(t, os.WriteFile(filepath.Join(cfg.TaskDir().SecretsDir, "fine"), []byte("x"), 0o600))
			if c.prepare != nil {
				c.prepare(cfg.TaskDir().SecretsDir)
			}
			_, _, err := td.StartTask(cfg)
			must.ErrorContains(t, err, "credentials: ")
			must.ErrorContains(t, err, c.want)
			must.StrNotContains(t, err.Error(), "host only")
			must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
		})
	}
}

func withVolumes(mounts ...*drivers.MountConfig) taskOpt {
	return func(c *drivers.TaskConfig, _ *TaskConfig) { c.Mounts = mounts }
}

// A host volume is an idmapped bind: a guest service running as www-data (UID 33) writes to it,
// the host sees UID 33, a second allocation reads the data, and destroying a task leaves the
// volume as it was. A read-only mount refuses writes.
// It runs on /tmp (tmpfs in the test host and the VM host) with a systemd 252 guest and on
// /var/tmp (ext4: the build machine's disk in the test host, the VM's own) with a systemd 257
// guest; each stops in order, without its systemd failing to unmount the volumes.
func TestHostVolume(t *testing.T) {
	td := newTestDriver(t, "")
	for i, base := range []string{os.TempDir(), "/var/tmp"} {
		vol, err := os.MkdirTemp(base, "volume-")
		must.NoError(t, err)
		t.Cleanup(func() { _ = os.RemoveAll(vol) })
		g := guests(t)[i]
		t.Run(nspawn.FilesystemType(vol)+", "+g.name, func(t *testing.T) { hostVolume(t, td, vol, g.toplevel) })
	}
}

func hostVolume(t *testing.T, td *testDriver, vol, toplevel string) {
	must.NoError(t, os.Chmod(vol, 0o755))
	ro := t.TempDir()
	must.NoError(t, os.WriteFile(filepath.Join(ro, "config"), []byte("read me"), 0o644))

	first := td.newTask(t, "vol1", toplevel, nil, withVolumes(
		&drivers.MountConfig{TaskPath: "/var/lib/app", HostPath: vol},
		&drivers.MountConfig{TaskPath: "/srv/config", HostPath: ro, Readonly: true},
	))
	td.start(t, first)
	waitLog(t, first, "longrun: started", 2*time.Minute)

	// The host's root owns the directory, so the guest's root does, and hands it to www-data.
	code, out, errOut := guestExec(t, td, first, "/bin/sh", "-c", "stat -c '%U %a' /var/lib/app && chown www-data:www-data /var/lib/app")
	must.Eq(t, 0, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	must.Eq(t, "root 755\n", out)
	code, out, errOut = guestExec(t, td, first, "systemd-run", "--quiet", "--wait", "--pipe", "-p", "User=www-data",
		"/bin/sh", "-c", "echo written-by-vol1 >/var/lib/app/data && stat -c '%U %G' /var/lib/app/data && cat /srv/config/config && echo && touch /srv/config/x")
	must.Eq(t, 1, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	must.Eq(t, "www-data www-data\nread me\n", out)
	must.StrContains(t, errOut, "Read-only file system")
	// As root, too.
	code, _, errOut = guestExec(t, td, first, "/bin/sh", "-c", "touch /srv/config/x")
	must.NotEq(t, 0, code)
	must.StrContains(t, errOut, "Read-only file system")

	var st unix.Stat_t
	must.NoError(t, unix.Stat(filepath.Join(vol, "data"), &st))
	must.Eq(t, uint32(33), st.Uid, must.Sprint("the host does not see the guest's www-data as UID 33"))
	must.Eq(t, uint32(33), st.Gid)
	_, err := os.Stat(filepath.Join(ro, "x"))
	must.True(t, os.IsNotExist(err))

	must.NoError(t, td.StopTask(first.ID, time.Minute, ""))
	res := td.waitExit(t, first.ID, time.Minute)
	must.Eq(t, 0, res.ExitCode, must.Sprintf("console:\n%s", logs(t, first)))
	must.StrNotContains(t, logs(t, first), "Failed unmounting")
	must.NoError(t, td.DestroyTask(first.ID, true))
	b, err := os.ReadFile(filepath.Join(vol, "data"))
	must.NoError(t, err, must.Sprint("destroying the task removed the volume's data"))
	must.Eq(t, "written-by-vol1\n", string(b))
	b, err = os.ReadFile(filepath.Join(ro, "config"))
	must.NoError(t, err)
	must.Eq(t, "read me", string(b))

	// Another allocation gets the same data, owned by its www-data.
	second := td.newTask(t, "vol2", toplevel, nil, withVolumes(&drivers.MountConfig{TaskPath: "/var/lib/app", HostPath: vol}))
	td.start(t, second)
	waitLog(t, second, "longrun: started", 2*time.Minute)
	code, out, errOut = guestExec(t, td, second, "systemd-run", "--quiet", "--wait", "--pipe", "-p", "User=www-data",
		"/bin/sh", "-c", "cat /var/lib/app/data && stat -c '%U' /var/lib/app/data && echo appended-by-vol2 >>/var/lib/app/data")
	must.Eq(t, 0, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	must.Eq(t, "written-by-vol1\nwww-data\n", out)
	b, err = os.ReadFile(filepath.Join(vol, "data"))
	must.NoError(t, err)
	must.Eq(t, "written-by-vol1\nappended-by-vol2\n", string(b))
}

// Bad volume mounts fail the start with the destination, the host path and why, and leave
// nothing behind; a filesystem without idmapped mounts (ramfs) is refused, naming it.
func TestVolumeRefusalsLeaveNothing(t *testing.T) {
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir)
	vol := t.TempDir()
	ramfs := t.TempDir()
	run(t, "mount", "-t", "ramfs", "ramfs", ramfs)
	t.Cleanup(func() { _ = unix.Unmount(ramfs, unix.MNT_DETACH) })
	before := inventory(t, dataDir)
	for _, c := range []struct {
		name, dest, host, want string
	}{
		{"over the store", "/nix/store", vol, "cannot be /nix"},
		{"over secrets", "/secrets", vol, "cannot be /secrets"},
		{"under alloc", "/alloc/data", vol, "cannot be /alloc"},
		{"over local", "/local", vol, "cannot be /local"},
		{"the machine's /etc", "/etc/app", vol, "cannot be /etc"},
		{"relative", "var/lib/app", vol, "must be an absolute path"},
		{"climbing", "/var/../etc", vol, "must be a clean path"},
		{"missing host path", "/data", filepath.Join(vol, "missing"), "no such file or directory"},
		{"no idmapped mounts", "/data", ramfs, "the filesystem does not support idmapped mounts (" + ramfs + ", filesystem ramfs)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := td.newTask(t, "badvol", systemdToplevel(t), nil, withVolumes(&drivers.MountConfig{TaskPath: c.dest, HostPath: c.host}))
			_, _, err := td.StartTask(cfg)
			must.ErrorContains(t, err, fmt.Sprintf("volume_mount destination = %q (host path %q): ", c.dest, c.host))
			must.ErrorContains(t, err, c.want)
			must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
		})
	}
	entries, err := os.ReadDir(vol)
	must.NoError(t, err)
	must.SliceEmpty(t, entries)
}

// hostFuse makes /dev/fuse in the test host as udev makes it on a real host (character device
// 10:229, mode 0666): the test host has no udev, and nspawn gives it no /dev/fuse.
func hostFuse(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); os.IsNotExist(err) {
		must.NoError(t, unix.Mknod("/dev/fuse", unix.S_IFCHR|0o666, int(unix.Mkdev(10, 229))))
	}
	must.NoError(t, os.Chmod("/dev/fuse", 0o666))
}

// An allowed device is bound into the machine and in its unit's device policy: the guest's root
// mounts a FUSE filesystem through /dev/fuse. A device of a Nomad device plugin reaches the
// task path Nomad gives. A device the plugin config does not allow fails the start, naming it
// and the allowlist, and leaves nothing.
func TestDevices(t *testing.T) {
	hostFuse(t)
	dataDir := t.TempDir()
	// A null device only root may open, as /dev/kvm is only for its group.
	const private = "/dev/nomad-driver-nixos-test-private"
	_ = os.Remove(private)
	must.NoError(t, unix.Mknod(private, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))))
	t.Cleanup(func() { _ = os.Remove(private) })
	td := newTestDriver(t, dataDir, func(pc *PluginConfig) { pc.AllowDevices = []string{"/dev/fuse", "/dev/net/tun", private} })
	cfg := td.newTask(t, "fuse", systemdToplevel(t), nil, withConfig(func(tc *TaskConfig) { tc.Devices = []string{"/dev/fuse"} }),
		func(c *drivers.TaskConfig, _ *TaskConfig) {
			c.Devices = []*drivers.DeviceConfig{{HostPath: "/dev/null", TaskPath: "/dev/plugin0", Permissions: "rw"}}
		})
	td.start(t, cfg)
	waitLog(t, cfg, "longrun: started", 2*time.Minute)
	machine := machineOf(t, cfg)
	must.StrContains(t, run(t, "systemctl", "show", "-p", "DeviceAllow", machine+".service"), "/dev/fuse rwm")

	code, out, errOut := guestExec(t, td, cfg, "/bin/sh", "-c",
		"mkdir -p /mnt/fuse && exec 3<>/dev/fuse && mount -i -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0 fusetest /mnt/fuse && grep -c 'fusetest /mnt/fuse fuse' /proc/self/mounts && umount -l /mnt/fuse && echo plugin0 >/dev/plugin0 && stat -c %t:%T /dev/plugin0")
	must.Eq(t, 0, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	must.Eq(t, "1\n1:3\n", out)

	// Where systemd enforces the device policy (cgroup v2, a BPF program on the unit's cgroup),
	// it is DeviceAllow= that lets the machine open /dev/fuse: without the entry it cannot.
	if td.d.cgroups.Mode == cgroupfs.CgroupUnified {
		run(t, "systemctl", "set-property", "--runtime", machine+".service", "DeviceAllow=", "DeviceAllow=char-pts rw")
		code, _, errOut := guestExec(t, td, cfg, "/bin/sh", "-c", "exec 3<>/dev/fuse")
		must.NotEq(t, 0, code)
		must.StrContains(t, errOut, "Operation not permitted")
		t.Logf("without its DeviceAllow= entry the machine cannot open /dev/fuse: %s", strings.TrimSpace(errOut))
	}

	before := inventory(t, dataDir)
	bad := td.newTask(t, "kvm", tinyToplevel(t), nil, withConfig(func(tc *TaskConfig) { tc.Devices = []string{"/dev/fuse", "/dev/kvm"} }))
	_, _, err := td.StartTask(bad)
	must.ErrorContains(t, err, `devices[1] = "/dev/kvm": not allowed by the plugin config (allow_devices: /dev/fuse, /dev/net/tun, `+private+`)`)
	must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
	unusable := td.newTask(t, "private", tinyToplevel(t), nil, withConfig(func(tc *TaskConfig) { tc.Devices = []string{private} }))
	_, _, err = td.StartTask(unusable)
	must.ErrorContains(t, err, `devices[0] = "`+private+`": mode 0600 on the host`)
	must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
}

// A task bind below an allowed directory reaches the machine idmapped, through a link that stays
// inside the directory; a link out of it is refused and leaves nothing.
func TestTaskBinds(t *testing.T) {
	allowed := t.TempDir()
	must.NoError(t, os.Mkdir(filepath.Join(allowed, "web"), 0o755))
	must.NoError(t, os.Chown(filepath.Join(allowed, "web"), 33, 33))
	must.NoError(t, os.Symlink("web", filepath.Join(allowed, "current")))
	must.NoError(t, os.Symlink("/etc", filepath.Join(allowed, "etc")))
	dataDir := t.TempDir()
	td := newTestDriver(t, dataDir, func(pc *PluginConfig) { pc.AllowBindPaths = []string{allowed} })
	cfg := td.newTask(t, "binds", systemdToplevel(t), nil, withConfig(func(tc *TaskConfig) {
		tc.Binds = []string{allowed + "/current:/var/lib/web", allowed + ":/srv/all:ro"}
	}))
	td.start(t, cfg)
	waitLog(t, cfg, "longrun: started", 2*time.Minute)
	code, out, errOut := guestExec(t, td, cfg, "systemd-run", "--quiet", "--wait", "--pipe", "-p", "User=www-data",
		"/bin/sh", "-c", "echo hi >/var/lib/web/f && stat -c %U /var/lib/web/f && ls /srv/all && touch /srv/all/web/g")
	must.Eq(t, 1, code, must.Sprintf("stdout %q, stderr %q", out, errOut))
	must.Eq(t, "www-data\ncurrent\netc\nweb\n", out)
	must.StrContains(t, errOut, "Read-only file system")
	var st unix.Stat_t
	must.NoError(t, unix.Stat(filepath.Join(allowed, "web", "f"), &st))
	must.Eq(t, uint32(33), st.Uid)

	before := inventory(t, dataDir)
	bad := td.newTask(t, "badbind", tinyToplevel(t), nil, withConfig(func(tc *TaskConfig) {
		tc.Binds = []string{allowed + "/etc:/data"}
	}))
	_, _, err := td.StartTask(bad)
	must.ErrorContains(t, err, `binds[0] = "`+allowed+`/etc:/data": a link leads out of `+allowed)
	must.SliceEmpty(t, leftovers(t, dataDir, before), must.Sprint(leftovers(t, dataDir, before)))
}

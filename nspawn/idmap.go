// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNoIDMap is what CheckIDMap returns, wrapped, for a filesystem that takes no idmapped mount.
var ErrNoIDMap = errors.New("the filesystem does not support idmapped mounts")

// CheckIDMap says whether the filesystem holding path takes an idmapped mount, as
// --bind=...:idmap needs (ext4, xfs, btrfs, and tmpfs from Linux 6.3 do; NFS, FUSE and ramfs
// do not). It idmaps a detached copy of the mount, never attached anywhere: the same call
// nspawn makes, so a machine is not booted only to fail on its binds.
func CheckIDMap(path string) error {
	userns, done, err := probeUserNamespace()
	if err != nil {
		return fmt.Errorf("making a user namespace to check idmapped mounts: %w", err)
	}
	defer done()
	fd, err := unix.OpenTree(unix.AT_FDCWD, path, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return fmt.Errorf("opening %s: %w", path, err)
	}
	defer unix.Close(fd)
	err = unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_IDMAP, Userns_fd: uint64(userns.Fd())})
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("%w (%s, filesystem %s)", ErrNoIDMap, path, FilesystemType(path))
	default:
		return fmt.Errorf("idmapping a copy of the mount of %s: %w", path, err)
	}
}

// probeUserNamespace returns a user namespace, of a /bin/sh that waits in it until done.
func probeUserNamespace() (*os.File, func(), error) {
	cmd := exec.Command("/bin/sh", "-c", "read _")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, err
	}
	// Any range will do: the namespace only lends its mapping to a mount that is never attached.
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: probeRange, Size: 65536}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: probeRange, Size: 65536}},
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	done := func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/user", cmd.Process.Pid))
	if err != nil {
		done()
		return nil, nil, err
	}
	return ns, func() { ns.Close(); done() }, nil
}

// probeRange is the last 64 Ki range nspawn may pick (0x6FFF0000).
const probeRange = 0x6FFF0000

// FilesystemType is the type of the filesystem mounted where path is, from
// /proc/self/mountinfo ("ext4", "nfs4", "fuse.sshfs"), or "unknown".
func FilesystemType(path string) string {
	if p, err := filepath.EvalSymlinks(path); err == nil {
		path = p
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	best, typ := -1, "unknown"
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields, tail := strings.Fields(pre), strings.Fields(post)
		if !ok || len(fields) < 5 || len(tail) < 1 {
			continue
		}
		mp := unescapeMountPath(fields[4])
		if (path == mp || mp == "/" || strings.HasPrefix(path, mp+"/")) && len(mp) >= best {
			best, typ = len(mp), tail[0]
		}
	}
	return typ
}

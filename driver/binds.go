// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// parseAllowBindPaths checks the plugin config's allow_bind_paths and returns them with their
// links resolved: a task's bind is checked against where the directories really are.
func parseAllowBindPaths(list []string) ([]string, error) {
	out := make([]string, 0, len(list))
	for i, p := range list {
		field := fmt.Sprintf("allow_bind_paths[%d] = %q", i, p)
		if !nspawn.Bindable(p) || filepath.Clean(p) != p {
			return nil, fmt.Errorf("%s: must be a clean absolute path without ':' or '\\', such as \"/srv/shared\"", field)
		}
		if p == "/" {
			return nil, fmt.Errorf("%s: would let tasks bind any host directory, /etc and the Nix store included; name the directories tasks may bind", field)
		}
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		if fi, err := os.Stat(real); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("%s: not a directory", field)
		}
		out = append(out, real)
	}
	return out, nil
}

// taskBinds resolves the task's binds, "HOST:DEST" or "HOST:DEST:ro", each HOST inside a
// directory of allow_bind_paths. HOST is opened from that directory through os.Root, so no link
// leads out of it, and nspawn gets the path it resolved to. Like volumes, the binds are idmapped.
func taskBinds(binds []string, allowed []string) ([]nspawn.Bind, error) {
	out := make([]nspawn.Bind, 0, len(binds))
	for i, b := range binds {
		field := fmt.Sprintf("binds[%d] = %q", i, b)
		host, dest, opts := splitBind(b)
		readOnly := false
		switch opts {
		case "", "rw":
		case "ro":
			readOnly = true
		default:
			return nil, fmt.Errorf("%s: write \"HOST:DEST\", or \"HOST:DEST:ro\" for a read-only bind", field)
		}
		if err := checkDest(dest); err != nil {
			return nil, fmt.Errorf("%s: the destination %w", field, err)
		}
		if !filepath.IsAbs(host) || filepath.Clean(host) != host {
			return nil, fmt.Errorf("%s: the host path must be a clean absolute path", field)
		}
		if len(allowed) == 0 {
			return nil, fmt.Errorf("%s: binds of host paths are off; the operator allows them below the directories of the plugin config's allow_bind_paths", field)
		}
		real, err := resolveInside(host, allowed)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		if err := nspawn.CheckIDMap(real); err != nil {
			return nil, fmt.Errorf("%s: %w; the machine runs in a user namespace, where the files would all be owned by nobody", field, err)
		}
		out = append(out, nspawn.Bind{Source: real, Dest: dest, ReadOnly: readOnly, IDMap: true})
	}
	return out, nil
}

func splitBind(b string) (host, dest, opts string) {
	host, rest, _ := strings.Cut(b, ":")
	dest, opts, _ = strings.Cut(rest, ":")
	return host, dest, opts
}

// resolveInside opens host from the allowed directory it is in, without following a link out of
// it or an absolute link (the kernel refuses both: RESOLVE_BENEATH), and returns the directory's
// real path.
func resolveInside(host string, allowed []string) (string, error) {
	for _, dir := range allowed {
		rel, ok := strings.CutPrefix(host, dir+"/")
		if host == dir {
			rel, ok = ".", true
		}
		if !ok {
			continue
		}
		fd, err := openBeneath(dir, rel)
		if errors.Is(err, unix.EXDEV) {
			return "", fmt.Errorf("a link leads out of %s, which allow_bind_paths allows, or is absolute; give the path it points to, if that is allowed", dir)
		}
		if errors.Is(err, unix.ENOTDIR) {
			return "", errors.New("not a directory on the host")
		}
		if err != nil {
			return "", err
		}
		defer unix.Close(fd)
		real, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
		if err != nil {
			return "", err
		}
		if real != dir && !strings.HasPrefix(real, dir+"/") || !nspawn.Bindable(real) {
			return "", fmt.Errorf("resolves to %q, outside %s or with characters nspawn's --bind cannot carry", real, dir)
		}
		return real, nil
	}
	return "", fmt.Errorf("not below any directory of the plugin config's allow_bind_paths (%s)", strings.Join(allowed, ", "))
}

// openBeneath opens the directory rel below dir as an O_PATH descriptor.
func openBeneath(dir, rel string) (int, error) {
	dfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(dfd)
	for {
		fd, err := unix.Openat2(dfd, rel, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS,
		})
		// EAGAIN: a rename elsewhere raced the lookup.
		if err != unix.EINTR && err != unix.EAGAIN {
			if err != nil {
				return -1, &os.PathError{Op: "open", Path: filepath.Join(dir, rel), Err: err}
			}
			return fd, nil
		}
	}
}

// distinctDests refuses two binds at one place in the machine.
func distinctDests(volumes, binds []nspawn.Bind) error {
	seen := map[string]bool{}
	for _, v := range volumes {
		seen[v.Dest] = true
	}
	for _, b := range binds {
		if seen[b.Dest] {
			return fmt.Errorf("binds: %q is the destination of a volume_mount or another bind already", b.Dest)
		}
		seen[b.Dest] = true
	}
	return nil
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package console

import (
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Nomad's log reader stops for good when the last writer of its FIFO closes, so a forwarder that
// crashes must not take the FIFO's last writer with it. It hands its FIFO descriptors to
// systemd's file descriptor store (FileDescriptorStoreMax= of its unit), which keeps them open
// across the unit's restarts and passes them to the next forwarder (sd_listen_fds protocol).

// inheritedFDs are the descriptors systemd passed from the store, by name.
func inheritedFDs() map[string]*os.File {
	files := map[string]*os.File{}
	if os.Getenv("LISTEN_PID") != strconv.Itoa(os.Getpid()) {
		return files
	}
	n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	names := strings.Split(os.Getenv("LISTEN_FDNAMES"), ":")
	for i := 0; i < n && i < len(names); i++ {
		fd := 3 + i
		unix.CloseOnExec(fd)
		files[names[i]] = os.NewFile(uintptr(fd), names[i])
	}
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		_ = os.Unsetenv(v)
	}
	return files
}

// storeFD gives a descriptor to systemd's store under name. Outside a unit there is no store.
func storeFD(name string, f *os.File) {
	notify("FDSTORE=1\nFDNAME="+name, unix.UnixRights(int(f.Fd())))
}

// dropStoredFD takes a descriptor out of the store, so the next forwarder opens the FIFO anew.
func dropStoredFD(name string) {
	notify("FDSTOREREMOVE=1\nFDNAME="+name, nil)
}

func notify(msg string, oob []byte) {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return
	}
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(s)
	// x/sys/unix maps a leading '@' to the abstract namespace.
	_ = unix.Sendmsg(s, []byte(msg), oob, &unix.SockaddrUnix{Name: addr}, 0)
}

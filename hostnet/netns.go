// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package hostnet

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"
)

// unprivilegedPortStart is the sysctl of a network namespace below which binding a port needs
// CAP_NET_BIND_SERVICE over the namespace's owner.
const unprivilegedPortStart = "/proc/sys/net/ipv4/ip_unprivileged_port_start"

// LowerUnprivilegedPortStart sets net.ipv4.ip_unprivileged_port_start of the network namespace
// at path to port, unless it is that low already, and returns the value it had (1024, the
// kernel's default, when it cannot be read). A guest's root holds its capabilities only over its
// own user namespace, not over a namespace the host's owns, so without it no guest service
// could bind port 80 there. The value covers IPv6 too.
func LowerUnprivilegedPortStart(path string, port int) (before int, err error) {
	before = 1024
	ch := make(chan error, 1)
	go func() {
		// The thread enters the namespace and is never unlocked: Go ends it with this goroutine
		// rather than hand it, still in the namespace, to other goroutines.
		runtime.LockOSThread()
		target, err := netns.GetFromPath(path)
		if err != nil {
			ch <- fmt.Errorf("opening network namespace %s: %w", path, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			ch <- fmt.Errorf("entering network namespace %s: %w", path, err)
			return
		}
		b, err := os.ReadFile(unprivilegedPortStart)
		var v int
		if err == nil {
			v, err = strconv.Atoi(strings.TrimSpace(string(b)))
		}
		if err != nil {
			ch <- fmt.Errorf("reading %s in network namespace %s: %w", unprivilegedPortStart, path, err)
			return
		}
		before = v
		if before > port {
			if err := os.WriteFile(unprivilegedPortStart, []byte(strconv.Itoa(port)), 0o644); err != nil {
				ch <- fmt.Errorf("writing %s in network namespace %s: %w", unprivilegedPortStart, path, err)
				return
			}
		}
		ch <- nil
	}()
	return before, <-ch
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"
)

// ttyDrain is how long a TTY session reads output left behind by its ended command.
const ttyDrain = 100 * time.Millisecond

// TerminalSize is a TTY's size in character cells.
type TerminalSize struct {
	Width, Height uint16
}

// ExecOptions describe a command to run inside a machine.
type ExecOptions struct {
	Command []string
	Tty     bool
	Stdin   io.Reader
	Stdout  io.Writer
	// Stderr is unused with Tty: a terminal has one output stream.
	Stderr io.Writer
	Resize <-chan TerminalSize
}

// ExecTools are the host programs exec uses.
type ExecTools struct {
	SystemdRun string
	Nsenter    string
	// Self is this binary; in a TTY session it runs first inside the machine (see TTYCommand).
	Self string
}

// TTYCommand is the argument that makes this binary start a TTY session inside a machine: it
// becomes the leader of a new session there, takes the terminal as its controlling terminal and
// executes the command. nsenter's own session lies outside the machine's PID namespace, where
// the guest's shells cannot see it and refuse job control.
const TTYCommand = "tty-session"

// ttySelfFD is where the session starter's binary is open in nsenter and its child: executed
// through /proc/self/fd, it need not exist in the machine's file system.
const ttySelfFD = 3

// guestPath covers NixOS and FHS guests.
const guestPath = "/run/wrappers/bin:/run/current-system/sw/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Exec runs a command in the machine and returns its exit status. Without a TTY it runs as a
// transient service of the guest's own systemd (through machined), so it gets the guest's
// cgroup, credentials, seccomp filter and capabilities. With a TTY it enters the namespaces of the
// guest's PID 1 instead: machined's PTY forwarding (systemd-run --pty -M) passes no input into a
// machine with a user namespace.
func Exec(ctx context.Context, tools ExecTools, machine string, leader int, o ExecOptions) (int, error) {
	if len(o.Command) == 0 {
		return 0, errors.New("exec needs a command")
	}
	if o.Tty {
		self, err := os.Open(tools.Self)
		if err != nil {
			return 0, fmt.Errorf("opening %s for the TTY session: %w", tools.Self, err)
		}
		defer self.Close()
		args := []string{"--target", strconv.Itoa(leader), "--all", "--", fmt.Sprintf("/proc/self/fd/%d", ttySelfFD), TTYCommand, "--"}
		cmd := exec.CommandContext(ctx, tools.Nsenter, append(args, o.Command...)...)
		cmd.Env = []string{"PATH=" + guestPath, "HOME=/root", "TERM=xterm-256color", "container=systemd-nspawn"}
		cmd.ExtraFiles = []*os.File{self}
		return execTTY(cmd, o)
	}
	args := []string{"--machine=" + machine, "--quiet", "--wait", "--collect", "--service-type=exec", "--pipe", "--"}
	cmd := exec.CommandContext(ctx, tools.SystemdRun, append(args, o.Command...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = o.Stdin, o.Stdout, o.Stderr
	return exitStatus(cmd.Run())
}

func execTTY(cmd *exec.Cmd, o ExecOptions) (int, error) {
	size := &pty.Winsize{Rows: 24, Cols: 80}
	// Apply a size that is already waiting, so the command starts with it.
	select {
	case s, ok := <-o.Resize:
		if ok {
			size = &pty.Winsize{Rows: s.Height, Cols: s.Width}
		}
	default:
	}
	// A new session without a controlling terminal: the session starter inside the machine takes it.
	ptmx, err := pty.StartWithAttrs(cmd, size, &syscall.SysProcAttr{Setsid: true})
	if err != nil {
		return 0, fmt.Errorf("starting exec with a TTY: %w", err)
	}
	defer ptmx.Close()
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case s, ok := <-o.Resize:
				if !ok {
					return
				}
				_ = pty.Setsize(ptmx, &pty.Winsize{Rows: s.Height, Cols: s.Width})
			case <-done:
				return
			}
		}
	}()
	if o.Stdin != nil {
		go func() { _, _ = io.Copy(ptmx, o.Stdin) }()
	}
	var copied sync.WaitGroup
	copied.Add(1)
	go func() {
		defer copied.Done()
		// Reading the master fails with EIO once the command closed the terminal.
		_, _ = io.Copy(o.Stdout, ptmx)
	}()
	err = cmd.Wait()
	// Like docker exec -t, the session ends with its lead process: background children may keep
	// the terminal open, so read only what is already there.
	if derr := ptmx.SetReadDeadline(time.Now().Add(ttyDrain)); derr != nil {
		time.Sleep(ttyDrain)
		ptmx.Close()
	}
	copied.Wait()
	return exitStatus(err)
}

// TTYSessionMain runs inside the machine, on the terminal: it starts a session and executes
// args, a command after "--". It returns only on failure.
func TTYSessionMain(args []string) int {
	if len(args) < 2 || args[0] != "--" {
		fmt.Fprintln(os.Stderr, TTYCommand+": want -- COMMAND [ARG...]")
		return 2
	}
	cmd := args[1:]
	if _, err := unix.Setsid(); err != nil {
		fmt.Fprintln(os.Stderr, TTYCommand+": setsid:", err)
		return 126
	}
	if err := unix.IoctlSetInt(0, unix.TIOCSCTTY, 0); err != nil {
		fmt.Fprintln(os.Stderr, TTYCommand+": taking the terminal:", err)
		return 126
	}
	unix.CloseOnExec(ttySelfFD)
	path, err := exec.LookPath(cmd[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, TTYCommand+":", err)
		return 127
	}
	err = unix.Exec(path, cmd, os.Environ())
	fmt.Fprintln(os.Stderr, TTYCommand+": executing", path+":", err)
	return 126
}

func exitStatus(err error) (int, error) {
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() >= 0 {
		return ee.ExitCode(), nil
	}
	if err != nil {
		return -1, err
	}
	return 0, nil
}

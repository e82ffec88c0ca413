// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"sync"

	"github.com/creack/pty"
)

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

// Exec runs a command in the machine as a transient service of the guest's own systemd (through
// machined), so it gets the guest's credentials, cgroup, seccomp filter and capabilities, not the
// host's. It returns the command's exit status.
func Exec(ctx context.Context, systemdRun, machine string, o ExecOptions) (int, error) {
	if len(o.Command) == 0 {
		return 0, errors.New("exec needs a command")
	}
	args := []string{"--machine=" + machine, "--quiet", "--wait", "--collect", "--service-type=exec"}
	if o.Tty {
		args = append(args, "--pty")
	} else {
		args = append(args, "--pipe")
	}
	args = append(args, "--")
	args = append(args, o.Command...)
	cmd := exec.CommandContext(ctx, systemdRun, args...)
	if o.Tty {
		return execTTY(cmd, o)
	}
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
	ptmx, err := pty.StartWithSize(cmd, size)
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
	copied.Wait()
	return exitStatus(err)
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

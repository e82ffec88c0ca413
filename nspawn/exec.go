// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
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
	// Self is this binary; in a session through nsenter it runs first inside the machine (see
	// SessionCommand).
	Self string
}

// SessionCommand is the argument that makes this binary start a command inside a machine, after
// nsenter entered its namespaces: it becomes the leader of a new session there, with --tty takes
// the terminal as its controlling terminal, finds the command and executes it. nsenter's own
// session lies outside the machine's PID namespace, where the guest's shells cannot see it and
// refuse job control.
const SessionCommand = "exec-session"

// sessionSelfFD is where the session starter's binary is open in nsenter and its child: executed
// through /proc/self/fd, it need not exist in the machine's file system.
const sessionSelfFD = 3

// guestPath covers NixOS and FHS guests.
const guestPath = "/run/wrappers/bin:/run/current-system/sw/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Exit codes of a command that cannot run, as shells give them.
const (
	ExitNotExecutable = 126
	ExitNotFound      = 127
)

// Exec runs a command in the machine and returns its exit status. A command that is not found
// exits 127 and one that cannot be executed 126, with the reason on stderr (on the terminal with
// Tty). Without a TTY, in a guest that runs systemd, it runs as a transient service of the
// guest's own systemd (through machined), so it gets the guest's cgroup, credentials, seccomp
// filter and capabilities. With a TTY, or in a guest whose PID 1 is not systemd, it enters the
// namespaces of the guest's PID 1 instead: machined's PTY forwarding (systemd-run --pty -M) passes
// no input into a machine with a user namespace.
func Exec(ctx context.Context, tools ExecTools, machine string, leader int, o ExecOptions) (int, error) {
	if len(o.Command) == 0 {
		return 0, errors.New("exec needs a command")
	}
	root, err := unix.Open(fmt.Sprintf("/proc/%d/root", leader), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("opening the root of machine %s: %w", machine, err)
	}
	defer unix.Close(root)
	if o.Tty || !runsSystemd(root) {
		return execSession(ctx, tools, leader, o)
	}
	// Checked here, as the guest would search, because the guest's systemd tells only its
	// journal why it could not execute a command.
	path, err := findCommand(root, o.Command[0])
	if err != nil {
		return reportCommandError(o.Stderr, err)
	}
	if !strings.Contains(o.Command[0], "/") {
		// systemd searches ExecSearchPath and keeps the name as argv[0], as execvp does.
		path = o.Command[0]
	}
	args := []string{"--machine=" + machine, "--quiet", "--wait", "--collect", "--service-type=exec", "--pipe"}
	// One directory per assignment: systemd-run 252 splits the value at blanks, later ones at colons.
	for _, dir := range filepath.SplitList(guestPath) {
		args = append(args, "--property=ExecSearchPath="+dir)
	}
	args = append(append(args, "--", path), o.Command[1:]...)
	cmd := exec.CommandContext(ctx, tools.SystemdRun, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = o.Stdin, o.Stdout, o.Stderr
	code, err := exitStatus(cmd.Run())
	if err == nil && code >= systemdExitFirst && code <= systemdExitLast {
		fmt.Fprintf(o.Stderr, "exec: status %d: the command exited %d itself, or systemd in machine %s could not set it up (see \"Process Exit Codes\" in systemd.exec(5) and journalctl -M %s)\n", code, code, machine, machine)
	}
	return code, err
}

// The exit codes systemd gives a service it could not set up or execute (systemd.exec(5)).
const (
	systemdExitFirst = 200
	systemdExitLast  = 243
)

// runsSystemd tells whether the guest's PID 1 is systemd, as sd_booted(3) does.
func runsSystemd(root int) bool {
	var st unix.Stat_t
	fd, err := openInRoot(root, "/run/systemd/system", unix.O_PATH)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR
}

// execSession enters the namespaces of the machine's PID 1 and runs the session starter there.
func execSession(ctx context.Context, tools ExecTools, leader int, o ExecOptions) (int, error) {
	self, err := os.Open(tools.Self)
	if err != nil {
		return 0, fmt.Errorf("opening %s for the exec session: %w", tools.Self, err)
	}
	defer self.Close()
	args := []string{"--target", strconv.Itoa(leader), "--all", "--", fmt.Sprintf("/proc/self/fd/%d", sessionSelfFD), SessionCommand}
	env := []string{"PATH=" + guestPath, "HOME=/root", "container=systemd-nspawn"}
	if o.Tty {
		args = append(args, "--tty")
		env = append(env, "TERM=xterm-256color")
	}
	cmd := exec.CommandContext(ctx, tools.Nsenter, append(append(args, "--"), o.Command...)...)
	cmd.Env = env
	cmd.ExtraFiles = []*os.File{self}
	if o.Tty {
		return execTTY(cmd, o)
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = o.Stdin, o.Stdout, o.Stderr
	return exitStatus(cmd.Run())
}

// commandError is a command that cannot be executed, with the exit code a shell gives.
type commandError struct {
	code int
	msg  string
}

func (e *commandError) Error() string { return e.msg }

// reportCommandError writes why the command cannot run to w and returns its exit code.
func reportCommandError(w io.Writer, err error) (int, error) {
	var ce *commandError
	if !errors.As(err, &ce) {
		return 0, err
	}
	fmt.Fprintln(w, ce.msg)
	return ce.code, nil
}

// findCommand finds a command the way execvp(3) in the machine would, below root (a directory fd
// of the machine's root, where absolute symlinks resolve as they do in the machine): a name with
// a slash is a path from /, the exec's working directory; a bare name is searched in guestPath.
// It returns the path to execute, or a *commandError.
func findCommand(root int, name string) (string, error) {
	if name == "" {
		return "", &commandError{ExitNotFound, "exec: the command name is empty"}
	}
	if strings.Contains(name, "/") {
		path := filepath.Join("/", name)
		if err := checkExecutable(root, path); err != nil {
			code := ExitNotExecutable
			if errors.Is(err, unix.ENOENT) {
				code = ExitNotFound
			}
			return "", &commandError{code, fmt.Sprintf("exec: %s: %v", name, err)}
		}
		return path, checkInterpreter(root, name, path)
	}
	var denied error
	for _, dir := range filepath.SplitList(guestPath) {
		path := filepath.Join(dir, name)
		err := checkExecutable(root, path)
		if err == nil {
			return path, checkInterpreter(root, name, path)
		}
		if denied == nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOTDIR) {
			denied = fmt.Errorf("%s: %w", path, err)
		}
	}
	if denied != nil {
		return "", &commandError{ExitNotExecutable, fmt.Sprintf("exec: %s: %v", name, denied)}
	}
	return "", &commandError{ExitNotFound, fmt.Sprintf("exec: %s: executable file not found in PATH (%s)", name, guestPath)}
}

// checkExecutable tells whether root may execute path: a regular file with an execute bit.
func checkExecutable(root int, path string) error {
	// O_PATH: execute permission needs no read permission.
	fd, err := openInRoot(root, path, unix.O_PATH)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	switch {
	case st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return unix.EISDIR
	case st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o111 == 0:
		return unix.EACCES
	}
	return nil
}

// maxInterpreters is how deep the kernel follows #! lines (BINPRM_MAX_RECURSION).
const maxInterpreters = 4

// checkInterpreter tells whether what path needs to be executed is there too: the interpreter
// of its #! line, or its ELF loader (PT_INTERP). execve reports a missing one as a missing
// command, ENOENT, which confuses everyone.
func checkInterpreter(root int, name, path string) error {
	for range maxInterpreters {
		interp, kind, err := interpreterOf(root, path)
		if err != nil || interp == "" {
			return nil
		}
		if err := checkExecutable(root, filepath.Join("/", interp)); err != nil {
			return &commandError{ExitNotExecutable, fmt.Sprintf("exec: %s: %s %s: %v", name, kind, interp, err)}
		}
		if kind == elfLoader {
			return nil
		}
		path = filepath.Join("/", interp)
	}
	return nil
}

const (
	scriptInterpreter = "bad interpreter"
	elfLoader         = "ELF loader"
)

// interpreterOf reads what the file at path names as its interpreter: "" for neither a script
// nor a dynamically linked ELF file, or a file it cannot read (execve then reports the error).
func interpreterOf(root int, path string) (interp, kind string, err error) {
	fd, err := openInRoot(root, path, unix.O_RDONLY|unix.O_NOCTTY|unix.O_NONBLOCK)
	if err != nil {
		return "", "", err
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	head := make([]byte, 256)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return "", "", err
	}
	head = head[:n]
	if line, ok := bytes.CutPrefix(head, []byte("#!")); ok {
		line, _, _ = bytes.Cut(line, []byte("\n"))
		if fields := strings.Fields(string(line)); len(fields) > 0 {
			return fields[0], scriptInterpreter, nil
		}
		return "", "", nil
	}
	if !bytes.HasPrefix(head, []byte(elf.ELFMAG)) {
		return "", "", nil
	}
	ef, err := elf.NewFile(f)
	if err != nil {
		return "", "", err
	}
	for _, p := range ef.Progs {
		if p.Type == elf.PT_INTERP {
			b, err := io.ReadAll(p.Open())
			if err != nil {
				return "", "", err
			}
			return string(bytes.TrimRight(b, "\x00")), elfLoader, nil
		}
	}
	return "", "", nil
}

// openInRoot opens path with root as its /.
func openInRoot(root int, path string, flags int) (int, error) {
	for {
		fd, err := unix.Openat2(root, path, &unix.OpenHow{
			Flags:   uint64(flags | unix.O_CLOEXEC),
			Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
		})
		if err != unix.EINTR && err != unix.EAGAIN {
			return fd, err
		}
	}
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

// SessionMain runs inside the machine: it starts a session and executes args, [--tty] -- COMMAND
// [ARG...]. It returns only on failure, with 127 or 126 for a command that is not found or
// cannot be executed.
func SessionMain(args []string) int {
	tty := len(args) > 0 && args[0] == "--tty"
	if tty {
		args = args[1:]
	}
	if len(args) < 2 || args[0] != "--" {
		fmt.Fprintln(os.Stderr, SessionCommand+": want [--tty] -- COMMAND [ARG...]")
		return 2
	}
	cmd := args[1:]
	if _, err := unix.Setsid(); err != nil {
		fmt.Fprintln(os.Stderr, SessionCommand+": setsid:", err)
		return ExitNotExecutable
	}
	if tty {
		if err := unix.IoctlSetInt(0, unix.TIOCSCTTY, 0); err != nil {
			fmt.Fprintln(os.Stderr, SessionCommand+": taking the terminal:", err)
			return ExitNotExecutable
		}
	}
	unix.CloseOnExec(sessionSelfFD)
	root, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, SessionCommand+": opening /:", err)
		return ExitNotExecutable
	}
	path, err := findCommand(root, cmd[0])
	if err != nil {
		code, _ := reportCommandError(os.Stderr, err)
		return code
	}
	unix.Close(root)
	err = unix.Exec(path, cmd, os.Environ())
	if errors.Is(err, unix.ENOENT) {
		// The file is there, so what is missing is its interpreter.
		fmt.Fprintf(os.Stderr, "exec: %s: %v: the file is there, so its interpreter (#! line or ELF loader) is missing\n", path, err)
	} else {
		fmt.Fprintf(os.Stderr, "exec: %s: %v\n", path, err)
	}
	return ExitNotExecutable
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

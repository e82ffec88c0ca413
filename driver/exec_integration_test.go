// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/drivers/proto"
	"github.com/shoenig/test/must"
)

// Exec in a guest that runs systemd (the command becomes a guest service) and in one whose PID 1
// is not systemd (the command enters the machine's namespaces), buffered as script checks use
// it and streamed over the plugin's gRPC protocol as `nomad alloc exec` uses it, with and
// without a TTY: a command that cannot run says why and exits 127 or 126, one that runs keeps its
// exit code and its streams.
func TestExecExitCodesAndReasons(t *testing.T) {
	td := newTestDriver(t, "")
	sysd := td.newTask(t, "execsd", systemdToplevel(t), nil)
	td.start(t, sysd)
	// The tiny guest sees the whole store, so busybox is there to run.
	tiny := td.newTask(t, "exectiny", tinyToplevel(t), nil, withConfig(func(tc *TaskConfig) { tc.StoreView = "host" }))
	td.start(t, tiny)
	waitLog(t, sysd, "longrun: started", 2*time.Minute)
	waitLog(t, tiny, "tinyinit: ready", 30*time.Second)

	type want struct {
		code           int
		stdout, stderr string
	}
	for _, guest := range []struct {
		name     string
		cfg      *drivers.TaskConfig
		sh, file string
	}{
		{"systemd guest", sysd, "/bin/sh", "/etc/passwd"},
		{"tinyinit guest", tiny, busyboxPath(t) + "/bin/sh", "/etc/os-release"},
	} {
		cases := []struct {
			name  string
			cmd   []string
			stdin string
			want  want
		}{
			{"absolute path not found", []string{"/no/such/cmd"}, "", want{127, "", "/no/such/cmd: no such file or directory"}},
			{"name not in PATH", []string{"no-such-cmd"}, "", want{127, "", "no-such-cmd: executable file not found in PATH"}},
			{"not executable", []string{guest.file}, "", want{126, "", guest.file + ": permission denied"}},
			{"a directory", []string{"/etc"}, "", want{126, "", "/etc: is a directory"}},
			{"a command that runs", []string{guest.sh, "-c", "read -r x; echo out $x; echo err >&2; exit 3"}, "in\n", want{3, "out in\n", "err\n"}},
		}
		t.Run(guest.name, func(t *testing.T) {
			for _, c := range cases {
				t.Run(c.name+", buffered", func(t *testing.T) {
					res, err := td.ExecTask(guest.cfg.ID, c.cmd, 30*time.Second)
					must.NoError(t, err)
					must.Eq(t, c.want.code, res.ExitResult.ExitCode, must.Sprintf("stdout %q, stderr %q", res.Stdout, res.Stderr))
					if c.stdin == "" {
						must.StrContains(t, string(res.Stderr), c.want.stderr)
						must.Eq(t, "", string(res.Stdout))
					} else {
						// No stdin here: read gets end of file.
						must.Eq(t, "out\n", string(res.Stdout))
						must.Eq(t, c.want.stderr, string(res.Stderr))
					}
				})
				t.Run(c.name+", streamed", func(t *testing.T) {
					code, stdout, stderr := streamExec(t, td, guest.cfg.ID, c.cmd, false, c.stdin)
					must.Eq(t, c.want.code, code, must.Sprintf("stdout %q, stderr %q", stdout, stderr))
					must.Eq(t, c.want.stdout, stdout)
					if c.stdin == "" {
						must.StrContains(t, stderr, c.want.stderr)
					} else {
						must.Eq(t, c.want.stderr, stderr)
					}
				})
				t.Run(c.name+", TTY", func(t *testing.T) {
					// A terminal has one output stream, where the reason appears too.
					code, stdout, stderr := streamExec(t, td, guest.cfg.ID, c.cmd, true, c.stdin)
					must.Eq(t, c.want.code, code, must.Sprintf("terminal %q", stdout))
					must.Eq(t, "", stderr)
					if c.stdin == "" {
						must.StrContains(t, stdout, c.want.stderr)
					} else {
						must.StrContains(t, stdout, "out in\r\n")
						must.StrContains(t, stdout, "err\r\n")
					}
				})
			}
		})
	}

	t.Run("a bare name is found in the guest's PATH", func(t *testing.T) {
		res, err := td.ExecTask(sysd.ID, []string{"cat", "/proc/1/comm"}, 30*time.Second)
		must.NoError(t, err)
		must.Eq(t, 0, res.ExitResult.ExitCode, must.Sprintf("stderr %q", res.Stderr))
		must.Eq(t, "systemd\n", string(res.Stdout))
	})
	t.Run("a missing interpreter is 126 with its path", func(t *testing.T) {
		for _, guest := range []struct {
			cfg *drivers.TaskConfig
			sh  string
		}{{sysd, "/bin/sh"}, {tiny, busyboxPath(t) + "/bin/sh"}} {
			res, err := td.ExecTask(guest.cfg.ID, []string{guest.sh, "-c", `printf '#!/no/such/interpreter\n' >/tmp/bad && chmod +x /tmp/bad`}, 30*time.Second)
			must.NoError(t, err)
			must.Eq(t, 0, res.ExitResult.ExitCode, must.Sprintf("stderr %q", res.Stderr))
			res, err = td.ExecTask(guest.cfg.ID, []string{"/tmp/bad"}, 30*time.Second)
			must.NoError(t, err)
			must.Eq(t, 126, res.ExitResult.ExitCode)
			must.StrContains(t, string(res.Stderr), "exec: /tmp/bad: bad interpreter /no/such/interpreter: no such file or directory")
		}
	})
	t.Run("systemd's own codes pass with a note", func(t *testing.T) {
		res, err := td.ExecTask(sysd.ID, []string{"/bin/sh", "-c", "echo err >&2; exit 203"}, 30*time.Second)
		must.NoError(t, err)
		must.Eq(t, 203, res.ExitResult.ExitCode)
		must.StrHasPrefix(t, "err\n", string(res.Stderr))
		must.StrContains(t, string(res.Stderr), "the command exited 203 itself, or systemd in machine")
	})
	t.Run("the tinyinit guest's command runs in the machine", func(t *testing.T) {
		code, stdout, stderr := streamExec(t, td, tiny.ID, []string{busyboxPath(t) + "/bin/busybox", "cat", "/proc/1/comm"}, false, "")
		must.Eq(t, 0, code, must.Sprint(stderr))
		must.Eq(t, "init\n", stdout)
	})
}

// busyboxPath is the busybox store path of the fixtures: the systemd fixture's init names it in
// its #! line.
func busyboxPath(t *testing.T) string {
	t.Helper()
	init, err := os.ReadFile(systemdToplevel(t) + "/init")
	must.NoError(t, err)
	line, _, _ := strings.Cut(string(init), "\n")
	path, ok := strings.CutSuffix(strings.TrimPrefix(line, "#!"), "/bin/sh")
	must.True(t, ok, must.Sprintf("the systemd fixture's init starts with %q", line))
	return path
}

// streamExec runs cmd through the plugin's gRPC exec stream, as the Nomad client does for
// `nomad alloc exec`, with stdin, and returns the exit code and what came on each stream.
func streamExec(t *testing.T, td *testDriver, taskID string, cmd []string, tty bool, stdin string) (int, string, string) {
	t.Helper()
	raw, ok := td.DriverHarness.DriverPlugin.(drivers.ExecTaskStreamingRawDriver)
	must.True(t, ok, must.Sprint("the plugin client has no streaming exec"))
	s := &execStream{}
	if stdin != "" {
		s.in = append(s.in, &drivers.ExecTaskStreamingRequestMsg{Stdin: &proto.ExecTaskStreamingIOOperation{Data: []byte(stdin)}})
	}
	s.in = append(s.in, &drivers.ExecTaskStreamingRequestMsg{Stdin: &proto.ExecTaskStreamingIOOperation{Close: true}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	must.NoError(t, raw.ExecTaskStreamingRaw(ctx, taskID, cmd, tty, s))
	s.mu.Lock()
	defer s.mu.Unlock()
	must.NotNil(t, s.result, must.Sprintf("no exit; stdout %q, stderr %q", s.stdout.String(), s.stderr.String()))
	return int(s.result.ExitCode), s.stdout.String(), s.stderr.String()
}

// execStream is the client's side of an exec stream: it sends stdin, then closes it, and keeps
// what comes back.
type execStream struct {
	in             []*drivers.ExecTaskStreamingRequestMsg
	mu             sync.Mutex
	stdout, stderr bytes.Buffer
	result         *proto.ExitResult
}

func (s *execStream) Recv() (*drivers.ExecTaskStreamingRequestMsg, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.in) == 0 {
		return nil, io.EOF
	}
	m := s.in[0]
	s.in = s.in[1:]
	return m, nil
}

func (s *execStream) Send(m *drivers.ExecTaskStreamingResponseMsg) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m.Stdout != nil {
		s.stdout.Write(m.Stdout.Data)
	}
	if m.Stderr != nil {
		s.stderr.Write(m.Stderr.Data)
	}
	if m.Exited {
		if m.Result == nil {
			return fmt.Errorf("exited without a result")
		}
		s.result = m.Result
	}
	return nil
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

// Package e2e drives a real Nomad agent, running the driver inside the systemd test host, the way
// a user does: through the nomad CLI and the HTTP API. `make e2e` sets it up.
package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

var repoRoot = func() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}()

func nomadAddr() string {
	if a := os.Getenv("NOMAD_ADDR"); a != "" {
		return a
	}
	return "http://127.0.0.1:4646"
}

func env(t *testing.T, name string) string {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		t.Fatalf("%s is not set: run the e2e tests through `make e2e`", name)
	}
	return v
}

// nomad runs the nomad CLI and returns its output; it fails the test on a non-zero exit.
func nomad(t *testing.T, args ...string) string {
	t.Helper()
	out, err := nomadErr(args...)
	must.NoError(t, err, must.Sprintf("nomad %s:\n%s", strings.Join(args, " "), out))
	return out
}

func nomadErr(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(repoRoot, "build", "nomad"), args...)
	cmd.Env = append(os.Environ(), "NOMAD_ADDR="+nomadAddr())
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// allocExec runs `nomad alloc exec` without a TTY, with stdin, and returns the CLI's exit code and
// its separate stdout and stderr.
func allocExec(t *testing.T, allocID, stdin string, cmd ...string) (int, string, string) {
	t.Helper()
	c := exec.Command(filepath.Join(repoRoot, "build", "nomad"), append([]string{"alloc", "exec", "-i=" + strconv.FormatBool(stdin != ""), "-t=false", "-task", "t", allocID}, cmd...)...)
	c.Env = append(os.Environ(), "NOMAD_ADDR="+nomadAddr())
	c.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	err := c.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("nomad alloc exec: %v", err)
	}
	return c.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

// allocExecTTY runs `nomad alloc exec -t` on the terminal a user would have (script gives it
// one) and returns what the terminal showed and the exit code.
func allocExecTTY(t *testing.T, allocID string, cmd string) (string, int) {
	t.Helper()
	c := exec.Command("script", "-qec", fmt.Sprintf("%s alloc exec -t -task t %s %s", filepath.Join(repoRoot, "build", "nomad"), allocID, cmd), "/dev/null")
	c.Env = append(os.Environ(), "NOMAD_ADDR="+nomadAddr())
	out, err := c.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("script: %v: %s", err, out)
	}
	return string(out), c.ProcessState.ExitCode()
}

// busybox is the fixtures' busybox store path, which the systemd fixture's init names in its
// #! line.
func busybox(t *testing.T) string {
	t.Helper()
	init, err := os.ReadFile(systemd(t) + "/init")
	must.NoError(t, err)
	line, _, _ := strings.Cut(string(init), "\n")
	path, ok := strings.CutSuffix(strings.TrimPrefix(line, "#!"), "/bin/sh")
	must.True(t, ok, must.Sprintf("the systemd fixture's init starts with %q", line))
	return path
}

// host runs a command inside the systemd test host, where the agent and the machines run.
func host(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(repoRoot, "e2e", "testhost", "testhost.sh"), append([]string{"exec"}, args...)...)
	out, err := cmd.CombinedOutput()
	must.NoError(t, err, must.Sprintf("in the test host: %s:\n%s", strings.Join(args, " "), out))
	return string(out)
}

// api GETs a Nomad HTTP API path into out.
func api(t *testing.T, path string, out any) {
	t.Helper()
	resp, err := http.Get(nomadAddr() + path)
	must.NoError(t, err)
	defer resp.Body.Close()
	must.Eq(t, http.StatusOK, resp.StatusCode, must.Sprintf("GET %s", path))
	must.NoError(t, json.NewDecoder(resp.Body).Decode(out))
}

// runJob registers the job spec e2e/jobs/<file> under the ID id, with the spec's HCL2 variables
// set to vars (strings as they are, other values as JSON, which HCL reads), and purges it when the
// test ends. The ID is the test's, not the spec's label: one spec serves the tests that differ only
// in its variables, and each test's job stays apart from the others' in Nomad's state.
func runJob(t *testing.T, id, file string, vars map[string]any) {
	t.Helper()
	args := []string{"job", "run", "-output"}
	for k, v := range vars {
		s, ok := v.(string)
		if !ok {
			b, err := json.Marshal(v)
			must.NoError(t, err)
			s = string(b)
		}
		args = append(args, "-var", k+"="+s)
	}
	args = append(args, filepath.Join(repoRoot, "e2e", "jobs", file))
	cmd := exec.Command(filepath.Join(repoRoot, "build", "nomad"), args...)
	cmd.Env = append(os.Environ(), "NOMAD_ADDR="+nomadAddr())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	must.NoError(t, err, must.Sprintf("nomad %s:\n%s", strings.Join(args, " "), stderr.String()))
	var spec struct{ Job map[string]any }
	must.NoError(t, json.Unmarshal(out, &spec))
	spec.Job["ID"], spec.Job["Name"] = id, id
	rendered, err := json.Marshal(spec)
	must.NoError(t, err)
	path := filepath.Join(t.TempDir(), id+".json")
	must.NoError(t, os.WriteFile(path, rendered, 0o644))
	nomad(t, "job", "run", "-json", "-detach", path)
	t.Cleanup(func() { _, _ = nomadErr("job", "stop", "-purge", id) })
}

type taskEvent struct {
	Type           string
	DisplayMessage string
	Details        map[string]string
}

type taskState struct {
	State    string
	Failed   bool
	Restarts int
	Events   []taskEvent
}

type allocation struct {
	ID           string
	NodeID       string
	ClientStatus string
	TaskStates   map[string]taskState
}

func allocations(t *testing.T, jobID string) []allocation {
	t.Helper()
	var allocs []allocation
	api(t, "/v1/job/"+jobID+"/allocations", &allocs)
	return allocs
}

// waitAlloc waits until the job's first allocation satisfies ok, and returns it.
func waitAlloc(t *testing.T, jobID string, timeout time.Duration, what string, ok func(allocation) bool) allocation {
	t.Helper()
	var last allocation
	err := wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			allocs := allocations(t, jobID)
			if len(allocs) == 0 {
				return false
			}
			last = allocs[0]
			return ok(last)
		}),
		wait.Timeout(timeout), wait.Gap(250*time.Millisecond),
	).Run()
	if err != nil {
		t.Fatalf("allocation of %s never got %s; last:\n%s", jobID, what, pretty(last))
	}
	return last
}

func running(a allocation) bool { return a.ClientStatus == "running" }

// hasEvent tells whether a task's events hold one of that type whose message contains text.
func hasEvent(ts taskState, typ, text string) bool {
	for _, e := range ts.Events {
		if e.Type == typ && strings.Contains(e.DisplayMessage, text) {
			return true
		}
	}
	return false
}

// waitOutput waits until f's output contains want.
func waitOutput(t *testing.T, timeout time.Duration, want string, f func() string) string {
	t.Helper()
	var out string
	err := wait.InitialSuccess(
		wait.BoolFunc(func() bool { out = f(); return strings.Contains(out, want) }),
		wait.Timeout(timeout), wait.Gap(250*time.Millisecond),
	).Run()
	if err != nil {
		t.Fatalf("never saw %q; last output:\n%s", want, out)
	}
	return out
}

// machinesOnHost lists the driver's machines in the test host.
func machinesOnHost(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(host(t, "machinectl", "list", "--no-legend"), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "nomad-") {
			out = append(out, f[0])
		}
	}
	return out
}

func pretty(v any) string {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
	return b.String()
}

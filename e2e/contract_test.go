// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// Init args and environment values reach the guest byte for byte. The jobspec below is what a
// user writes: Nomad evaluates the strings of a task's config as HCL templates twice (when the
// job is parsed and again on the client), so a literal "${" takes "$$${"; "$$", "%" and "\\"
// (a backslash) pass as HCL writes them.
func TestArgsAndEnvByteForByte(t *testing.T) {
	runJob(t, "e2e-bytes", "args-bytes.nomad.hcl", map[string]any{"toplevel": tiny(t)})
	a := waitAlloc(t, "e2e-bytes", time.Minute, "completion", func(a allocation) bool { return a.ClientStatus != "pending" && a.ClientStatus != "running" })
	must.EqOp(t, "complete", a.ClientStatus, must.Sprint(pretty(a.TaskStates["t"].Events)))
	out := nomad(t, "alloc", "logs", a.ID, "t")
	lines := strings.Split(out, "\n")
	for _, want := range []string{
		"<0>$X",
		"<1>${X}",
		"<2>D:$$",
		"<3>%n",
		"<4>%%",
		`<5>end\`,
		"<6>$(touch /tmp/x)",
		"<7>$PATH",
		"tinyinit env SECRET=pa$$word",
	} {
		must.SliceContains(t, lines, want, must.Sprintf("console:\n%s", out))
	}
}

// A kill_signal other than SIGTERM or SIGINT is that signal for the guest's PID 1, nothing else,
// and the machine is killed only after kill_timeout.
func TestCustomKillSignal(t *testing.T) {
	const timeout = 3 * time.Second
	runJob(t, "e2e-killsig", "machine.nomad.hcl", map[string]any{"toplevel": tiny(t), "type": "service", "kill_signal": "SIGUSR1", "kill_timeout": "3s"})
	alloc := waitAlloc(t, "e2e-killsig", time.Minute, "running", running)
	logs := func() string { out, _ := nomadErr("alloc", "logs", alloc.ID, "t"); return out }
	waitOutput(t, 30*time.Second, "tinyinit: ready", logs)
	machine := "nomad-" + alloc.ID[:8] + "-t"

	began := time.Now()
	nomad(t, "job", "stop", "-detach", "e2e-killsig")
	waitOutput(t, 10*time.Second, "tinyinit: got signal SIGUSR1", logs)
	time.Sleep(time.Until(began.Add(timeout / 2)))
	must.SliceContains(t, machinesOnHost(t), machine, must.Sprint("the machine was gone before half the kill_timeout"))

	a := waitAlloc(t, "e2e-killsig", time.Minute, "the stop", func(a allocation) bool { return a.ClientStatus != "running" })
	must.GreaterEq(t, timeout, time.Since(began))
	must.True(t, hasEvent(a.TaskStates["t"], "Terminated", "Signal: 9"), must.Sprint(pretty(a.TaskStates["t"].Events)))
	out := logs()
	must.StrNotContains(t, out, "tinyinit: poweroff")
	must.EqOp(t, 1, strings.Count(out, "tinyinit: got signal SIGUSR1"), must.Sprint(out))
}

// A profile link is refused with what to give instead; a trailing slash is fine.
func TestToplevelLinkAndSlash(t *testing.T) {
	const link = "/run/e2e-profile-web"
	host(t, "ln", "-sfn", tiny(t), link)
	t.Cleanup(func() { host(t, "rm", "-f", link) })
	runJob(t, "e2e-link", "machine.nomad.hcl", map[string]any{"toplevel": link})
	a := waitAlloc(t, "e2e-link", time.Minute, "failure", func(a allocation) bool { return a.ClientStatus == "failed" })
	out := nomad(t, "alloc", "status", a.ID)
	must.StrContains(t, out, "a symbolic link, and the driver does not follow links", must.Sprint(out))
	must.StrContains(t, out, "readlink -f", must.Sprint(out))

	runJob(t, "e2e-slash", "machine.nomad.hcl", map[string]any{"toplevel": tiny(t) + "/", "init_args": []string{"print=slash-ok", "exit=0"}})
	a = waitAlloc(t, "e2e-slash", time.Minute, "completion", func(a allocation) bool { return a.ClientStatus == "complete" })
	must.StrContains(t, nomad(t, "alloc", "logs", a.ID, "t"), "slash-ok")
}

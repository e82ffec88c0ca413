// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

const testToplevel = "/nix/store/0c7hkqjx3pb2xvdm0ncvb8hgxwqbb1ps-nixos-system-web-25.05"

func testSpec() *Spec {
	return &Spec{
		Machine:      "nomad-3f2504e0-web",
		Description:  "Nomad task web of allocation 3f2504e0 (job example)",
		Root:         "/var/lib/nomad-driver-nixos/machines/nomad-3f2504e0-web/root",
		ExitFile:     "/var/lib/nomad-driver-nixos/machines/nomad-3f2504e0-web/exit",
		ConsoleFile:  "/var/lib/nomad-driver-nixos/machines/nomad-3f2504e0-web/console.log",
		Toplevel:     testToplevel,
		InitArgs:     []string{"systemd.unit=multi-user.target", "--help"},
		UUID:         "5c3d1ea1b6f84ff1a6a04bc1e4c1a0d2",
		NspawnPath:   "/run/current-system/sw/bin/systemd-nspawn",
		Slice:        "machine.slice",
		PrivateUsers: "pick",
		Binds: []Bind{
			{Source: "/var/lib/nomad/alloc/3f2504e0/alloc", Dest: "/alloc"},
			{Source: "/var/lib/nomad/alloc/3f2504e0/web/logs", Dest: "/alloc/logs", ReadOnly: true},
			{Source: "/var/lib/nomad/alloc/3f2504e0/web/local", Dest: "/local"},
		},
		Env: map[string]string{
			"ZED":             "last",
			"NOMAD_TASK_NAME": "web",
			"A":               "with space and = sign",
			"EMPTY":           "",
		},
		ReadyTimeout: 90 * time.Second,
		StopTimeout:  30 * time.Second,
		RebootPolicy: RebootExit,
		Store: StoreView{
			Dir:   "/var/lib/nomad-driver-nixos/store",
			Paths: []string{testToplevel[len("/nix/store/"):], "1b9p07z77phvv2hf6gm9f28syrq2bmz4-link", "3n58xw4373jp0ljirf06d8077j15pc4j-glibc-2.40"},
			Links: map[string]string{"1b9p07z77phvv2hf6gm9f28syrq2bmz4-link": "/nix/store/3n58xw4373jp0ljirf06d8077j15pc4j-glibc-2.40"},
			View:  "/var/lib/nomad-driver-nixos/machines/nomad-3f2504e0-web/store",
		},
	}
}

func TestSpecArgs_Golden(t *testing.T) {
	want := []string{
		"/run/current-system/sw/bin/systemd-nspawn",
		"--quiet",
		"--keep-unit",
		"--register=yes",
		"--settings=no",
		"--machine=nomad-3f2504e0-web",
		"--directory=/var/lib/nomad-driver-nixos/machines/nomad-3f2504e0-web/root",
		"--private-users=pick",
		"--private-users-ownership=auto",
		"--kill-signal=SIGRTMIN+3",
		"--notify-ready=yes",
		"--console=read-only",
		"--link-journal=no",
		"--timezone=off",
		"--resolv-conf=off",
		// The closure view: a read-only view with one mount point per path, then one read-only
		// bind per path; the symlink is in the view itself.
		"--bind-ro=/var/lib/nomad-driver-nixos/machines/nomad-3f2504e0-web/store:/nix/store",
		"--bind-ro=/var/lib/nomad-driver-nixos/store/0c7hkqjx3pb2xvdm0ncvb8hgxwqbb1ps-nixos-system-web-25.05:/nix/store/0c7hkqjx3pb2xvdm0ncvb8hgxwqbb1ps-nixos-system-web-25.05",
		"--bind-ro=/var/lib/nomad-driver-nixos/store/3n58xw4373jp0ljirf06d8077j15pc4j-glibc-2.40:/nix/store/3n58xw4373jp0ljirf06d8077j15pc4j-glibc-2.40",
		"--network-veth",
		"--uuid=5c3d1ea1b6f84ff1a6a04bc1e4c1a0d2",
		"--bind=/var/lib/nomad/alloc/3f2504e0/alloc:/alloc",
		"--bind-ro=/var/lib/nomad/alloc/3f2504e0/web/logs:/alloc/logs",
		"--bind=/var/lib/nomad/alloc/3f2504e0/web/local:/local",
		"--setenv=A=with space and = sign",
		"--setenv=EMPTY=",
		"--setenv=NOMAD_TASK_NAME=web",
		"--setenv=ZED=last",
		"--",
		testToplevel + "/init",
		"systemd.unit=multi-user.target",
		"--help",
	}
	must.Eq(t, want, testSpec().Args())
}

func TestSpecArgs_Minimal(t *testing.T) {
	s := &Spec{
		Machine:      "nomad-3f2504e0-m",
		Root:         "/r",
		Toplevel:     testToplevel,
		NspawnPath:   "/bin/systemd-nspawn",
		PrivateUsers: "524288:65536",
		Store:        StoreView{Dir: "/nix/store"},
	}
	args := s.Args()
	must.EqOp(t, "/bin/systemd-nspawn", args[0])
	must.SliceContainsOp(t, args, "--private-users=524288:65536")
	// Without a UUID, binds, env or init args, the command line ends with "-- <toplevel>/init".
	// The host view binds the whole store.
	must.Eq(t, []string{"--bind-ro=/nix/store:/nix/store", "--network-veth", "--", testToplevel + "/init"}, args[len(args)-4:])
	for _, a := range args {
		must.StrNotContains(t, a, "--uuid")
		must.StrNotContains(t, a, "--setenv")
	}
}

func TestSpecArgs_EnvSortedAndStable(t *testing.T) {
	s := testSpec()
	s.Env = map[string]string{}
	for _, k := range []string{"b", "B", "a", "_x", "A1", "A"} {
		s.Env[k] = k
	}
	var got []string
	for _, a := range s.Args() {
		if len(a) > 9 && a[:9] == "--setenv=" {
			got = append(got, a[9:])
		}
	}
	must.Eq(t, []string{"A=A", "A1=A1", "B=B", "_x=_x", "a=a", "b=b"}, got)
}

func TestSpecValidate(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*Spec)
		errSub string
	}{
		{"valid", func(*Spec) {}, ""},
		{"no exit file", func(s *Spec) { s.ExitFile = "" }, "exit file"},
		{"relative console file", func(s *Spec) { s.ConsoleFile = "console.log" }, `"console.log"`},
		{"relative exit file", func(s *Spec) { s.ExitFile = "exit" }, `"exit"`},
		{"quote in exit file", func(s *Spec) { s.ExitFile = "/a'b" }, `"/a'b"`},
		{"dollar in exit file", func(s *Spec) { s.ExitFile = "/a$b" }, `"/a$b"`},
		{"newline in exit file", func(s *Spec) { s.ExitFile = "/a\nb" }, `"/a\nb"`},
		{"relative bind source", func(s *Spec) { s.Binds[0].Source = "alloc" }, `"alloc"`},
		{"relative bind dest", func(s *Spec) { s.Binds[1].Dest = "alloc/logs" }, `"alloc/logs"`},
		{"colon in source", func(s *Spec) { s.Binds[0].Source = "/a:b" }, `"/a:b"`},
		{"colon in dest", func(s *Spec) { s.Binds[2].Dest = "/local:rbind" }, `"/local:rbind"`},
		{"backslash in source", func(s *Spec) { s.Binds[0].Source = `/a\b` }, `"/a\\b"`},
		{"newline in dest", func(s *Spec) { s.Binds[0].Dest = "/a\nb" }, `"/a\nb"`},
		{"NUL in source", func(s *Spec) { s.Binds[0].Source = "/a\x00b" }, `"/a\x00b"`},
		{"NUL in env value", func(s *Spec) { s.Env["BAD"] = "x\x00y" }, `"BAD"`},
		{"NUL in env name", func(s *Spec) { s.Env["B\x00AD"] = "x" }, `"B\x00AD"`},
		{"= in env name", func(s *Spec) { s.Env["B=AD"] = "x" }, `"B=AD"`},
		{"NUL in init arg", func(s *Spec) { s.InitArgs = append(s.InitArgs, "a\x00b") }, `"a\x00b"`},
		{"dash in env name", func(s *Spec) { s.Env["NOMAD_META_a-b"] = "x" }, `"NOMAD_META_a-b"`},
		{"invalid UTF-8 in env value", func(s *Spec) { s.Env["BAD"] = "x\xffy" }, `"BAD" = "x\xffy"`},
		{"invalid UTF-8 in init arg", func(s *Spec) { s.InitArgs = append(s.InitArgs, "a\xffb") }, `init argument 2 = "a\xffb"`},
		{"dollars, percents and backslashes pass", func(s *Spec) {
			s.InitArgs = append(s.InitArgs, "$X", "${X}", "$$", "%n", "%%", `end\`, "$(touch /tmp/x)")
			s.Env["SECRET"] = "pa$$word%n\\"
		}, ""},
		{"no store dir", func(s *Spec) { s.Store.Dir = "" }, "store directory"},
		{"colon in store dir", func(s *Spec) { s.Store.Dir = "/a:b" }, `"/a:b"`},
		{"store path with slash", func(s *Spec) { s.Store.Paths[0] = "../etc" }, `"../etc"`},
		{"store path dot-dot", func(s *Spec) { s.Store.Paths[0] = ".." }, `".."`},
		{"colon in store path", func(s *Spec) { s.Store.Paths[0] = "a:/etc" }, `"a:/etc"`},
		{"closure view without a view dir", func(s *Spec) { s.Store.View = "" }, "store view directory"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := testSpec()
			c.mutate(s)
			err := s.Validate()
			if c.errSub == "" {
				must.NoError(t, err)
				return
			}
			must.Error(t, err)
			must.StrContains(t, err.Error(), c.errSub)
		})
	}
}

// The network mode picks exactly one of nspawn's network options.
func TestSpecArgs_Network(t *testing.T) {
	for _, tc := range []struct {
		name string
		net  Network
		want []string
	}{
		{"veth by default", Network{}, []string{"--network-veth"}},
		{"veth", Network{Mode: NetworkVeth}, []string{"--network-veth"}},
		{"veth of the driver", Network{Mode: NetworkVeth, VethHost: "vn-0123456789ab", VethGuest: "eth0"}, []string{"--network-veth-extra=vn-0123456789ab:eth0"}},
		{"veth on a host bridge", Network{Mode: NetworkVeth, Bridge: "br0"}, []string{"--network-bridge=br0"}},
		{"none", Network{Mode: NetworkNone}, []string{"--private-network"}},
		{"host", Network{Mode: NetworkHost}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Spec{Machine: "m", Root: "/r", Toplevel: testToplevel, NspawnPath: "/n", PrivateUsers: "pick", Network: tc.net}
			var got []string
			for _, a := range s.Args() {
				if strings.HasPrefix(a, "--network-") || a == "--private-network" {
					got = append(got, a)
				}
			}
			must.Eq(t, tc.want, got)
		})
	}
}

func TestSpecArgs_Privileges(t *testing.T) {
	s := Spec{Privileges: Privileges{
		AddCaps: []string{"CAP_SYS_TIME"}, DropCaps: []string{"CAP_NET_RAW", "CAP_SYS_BOOT"},
		AllowSystemCalls: []string{"@clock"}, DenySystemCalls: []string{"@debug", "sethostname"},
		NoNewPrivileges: true,
	}}
	args := s.Args()
	for _, want := range []string{
		"--capability=CAP_SYS_TIME", "--drop-capability=CAP_NET_RAW,CAP_SYS_BOOT",
		"--system-call-filter=@clock", "--system-call-filter=~@debug sethostname", "--no-new-privileges=yes",
	} {
		must.SliceContains(t, args, want)
	}
	// Guest arguments come after "--", never among nspawn's.
	must.Eq(t, "--", args[len(args)-2])
}

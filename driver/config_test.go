// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// A store path of the right shape that does not exist on any host.
const absentToplevel = "/nix/store/0c7hkqjx3pb2xvdm0ncvb8hgxwqbb1ps-nixos-system-web-25.05"

func validPluginConfig() PluginConfig {
	return PluginConfig{
		Enabled:        true,
		DataDir:        "/var/lib/nomad-driver-nixos",
		NspawnPath:     "/run/current-system/sw/bin/systemd-nspawn",
		SystemdRunPath: "/run/current-system/sw/bin/systemd-run",
		Slice:          "machine.slice",
		TasksMax:       16384,
		AddressPool:    "10.235.0.0/16",
	}
}

// mustNameField checks that an error names the field and shows the bad value.
func mustNameField(t *testing.T, err error, field, value string) {
	t.Helper()
	must.Error(t, err)
	must.StrContains(t, err.Error(), field)
	must.StrContains(t, err.Error(), value)
}

func TestPluginConfigValidate_Errors(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*PluginConfig)
		field  string
		value  string
	}{
		{"relative data_dir", func(c *PluginConfig) { c.DataDir = "var/lib/x" }, "data_dir", `"var/lib/x"`},
		{"empty data_dir", func(c *PluginConfig) { c.DataDir = "" }, "data_dir", `""`},
		{"root data_dir", func(c *PluginConfig) { c.DataDir = "/" }, "data_dir", `"/"`},
		{"root data_dir, unclean", func(c *PluginConfig) { c.DataDir = "//./" }, "data_dir", `"//./"`},
		{"root data_dir via ..", func(c *PluginConfig) { c.DataDir = "/var/.." }, "data_dir", `"/var/.."`},
		{"quote in data_dir", func(c *PluginConfig) { c.DataDir = "/var/lib/it's" }, "data_dir", `"/var/lib/it's"`},
		{"colon in data_dir", func(c *PluginConfig) { c.DataDir = "/var/lib/a:b" }, "data_dir", `"/var/lib/a:b"`},
		{"newline in data_dir", func(c *PluginConfig) { c.DataDir = "/var/lib/a\nb" }, "data_dir", `"/var/lib/a\nb"`},
		{"slice without suffix", func(c *PluginConfig) { c.Slice = "machine" }, "slice", `"machine"`},
		{"slice of another unit type", func(c *PluginConfig) { c.Slice = "machine.service" }, "slice", `"machine.service"`},
		{"slice with a slash", func(c *PluginConfig) { c.Slice = "a/b.slice" }, "slice", `"a/b.slice"`},
		{"slice with a space", func(c *PluginConfig) { c.Slice = "my machines.slice" }, "slice", `"my machines.slice"`},
		{"empty slice", func(c *PluginConfig) { c.Slice = "" }, "slice", `""`},
		{"only the suffix", func(c *PluginConfig) { c.Slice = ".slice" }, "slice", `".slice"`},
		{"negative tasks_max", func(c *PluginConfig) { c.TasksMax = -1 }, "tasks_max", "-1"},
		{"relative nspawn_path", func(c *PluginConfig) { c.NspawnPath = "systemd-nspawn" }, "nspawn_path", `"systemd-nspawn"`},
		{"relative systemd_run_path", func(c *PluginConfig) { c.SystemdRunPath = "bin/systemd-run" }, "systemd_run_path", `"bin/systemd-run"`},
		{"console_backlog without a unit", func(c *PluginConfig) { c.ConsoleBacklog = "1000" }, "console_backlog", `"1000"`},
		{"console_backlog zero", func(c *PluginConfig) { c.ConsoleBacklog = "0MiB" }, "console_backlog", `"0MiB"`},
		{"console_backlog negative", func(c *PluginConfig) { c.ConsoleBacklog = "-1GiB" }, "console_backlog", `"-1GiB"`},
		{"console_backlog fraction", func(c *PluginConfig) { c.ConsoleBacklog = "1.5GiB" }, "console_backlog", `"1.5GiB"`},
		{"relative nix_store_path", func(c *PluginConfig) { c.NixStorePath = "nix-store" }, "nix_store_path", `"nix-store"`},
		{"unknown store", func(c *PluginConfig) { c.Store = "nix" }, "store", `"nix"`},
		{"bad key", func(c *PluginConfig) { c.TrustedPublicKeys = []string{"cache.nixos.org-1"} }, "trusted_public_keys[0]", `"cache.nixos.org-1"`},
		{"short key", func(c *PluginConfig) { c.TrustedPublicKeys = []string{"k:AAAA"} }, "trusted_public_keys[0]", `"k:AAAA"`},
		{"substituter without scheme", func(c *PluginConfig) { c.Substituters = []string{"cache.example.org"} }, "substituters[0]", `"cache.example.org"`},
		{"trusted substituter with a query", func(c *PluginConfig) { c.TrustedSubstituters = []string{"https://c?x=1"} }, "trusted_substituters[0]", `"https://c?x=1"`},
		{"gc_grace not a duration", func(c *PluginConfig) { c.GCGrace = "1 day" }, "gc_grace", `"1 day"`},
		{"gc_grace negative", func(c *PluginConfig) { c.GCGrace = "-1h" }, "gc_grace", `"-1h"`},
		{"address_pool not a network", func(c *PluginConfig) { c.AddressPool = "10.235.0.1" }, "address_pool", `"10.235.0.1"`},
		{"address_pool with host bits", func(c *PluginConfig) { c.AddressPool = "10.235.0.1/16" }, "address_pool", `"10.235.0.1/16"`},
		{"address_pool too small", func(c *PluginConfig) { c.AddressPool = "10.235.0.0/30" }, "address_pool", `"10.235.0.0/30"`},
		{"address_pool IPv6", func(c *PluginConfig) { c.AddressPool = "fd00::/64" }, "address_pool", `"fd00::/64"`},
		{"address_pool_ipv6 IPv4", func(c *PluginConfig) { c.AddressPoolIPv6 = "10.0.0.0/8" }, "address_pool_ipv6", `"10.0.0.0/8"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pc := validPluginConfig()
			c.mutate(&pc)
			mustNameField(t, pc.validate(), c.field+" = ", c.value)
		})
	}
}

func TestPluginConfigValidate_OK(t *testing.T) {
	for _, slice := range []string{"machine.slice", "nomad-machines.slice", "a_b:c.d.slice", `x\x2dy.slice`} {
		pc := validPluginConfig()
		pc.Slice = slice
		must.NoError(t, pc.validate(), must.Sprint(slice))
	}
	pc := validPluginConfig()
	pc.TasksMax = 0
	must.NoError(t, pc.validate())

	pc = validPluginConfig()
	pc.DataDir = "/var/lib//nixos/./machines/"
	must.NoError(t, pc.validate())
	must.EqOp(t, "/var/lib/nixos/machines", pc.DataDir)
}

func TestPluginConfigValidate_FindsTools(t *testing.T) {
	bin := t.TempDir()
	nspawnBin := filepath.Join(bin, "systemd-nspawn")
	must.NoError(t, os.WriteFile(nspawnBin, []byte("#!/bin/sh\n"), 0o755))
	t.Setenv("PATH", bin)

	pc := validPluginConfig()
	pc.NspawnPath, pc.SystemdRunPath = "", ""
	must.NoError(t, pc.validate())
	// Found in PATH.
	must.EqOp(t, nspawnBin, pc.NspawnPath)
	// Not in PATH: where NixOS keeps it, for the fingerprint to report if it is missing.
	must.EqOp(t, "/run/current-system/sw/bin/systemd-run", pc.SystemdRunPath)

	// Configured paths are kept as they are.
	pc = validPluginConfig()
	pc.NspawnPath = "/opt/systemd/bin/systemd-nspawn"
	must.NoError(t, pc.validate())
	must.EqOp(t, "/opt/systemd/bin/systemd-nspawn", pc.NspawnPath)
}

func TestValidateToplevel_Pattern(t *testing.T) {
	hash := "0c7hkqjx3pb2xvdm0ncvb8hgxwqbb1ps"
	for _, p := range []string{
		"",
		"nixos-system",
		"/etc",
		"/nix/store",
		"/nix/store/",
		"/nix/store/" + hash,
		"/nix/store/" + hash + "-",
		"nix/store/" + hash + "-nixos-system-web",
		"/nix/store/" + hash + "-nixos-system-web/..",
		"/nix/store/" + hash + "-nixos-system-web/../../../etc",
		"/nix/store/../../etc/" + hash + "-x",
		"/nix/store/" + hash + "-nixos-system-web/sw",
		"/nix/store/./" + hash + "-nixos-system-web",
		"//nix/store/" + hash + "-nixos-system-web",
		"/nix/store/" + hash[:31] + "-nixos-system-web",
		"/nix/store/" + hash + "x-nixos-system-web",
		// e, o, t and u are not in Nix's base32 alphabet; upper case is not either.
		"/nix/store/e" + hash[1:] + "-nixos-system-web",
		"/nix/store/o" + hash[1:] + "-nixos-system-web",
		"/nix/store/t" + hash[1:] + "-nixos-system-web",
		"/nix/store/u" + hash[1:] + "-nixos-system-web",
		"/nix/store/" + strings.ToUpper(hash) + "-nixos-system-web",
		"/nix/store/" + hash + "-nixos system",
		"/nix/store/" + hash + "-nixos\nsystem",
		"/nix/store/" + hash + "-nixos-system-web\x00",
		"/gnu/store/" + hash + "-nixos-system-web",
	} {
		t.Run(fmt.Sprintf("%q", p), func(t *testing.T) {
			_, err := validateToplevel(p)
			mustNameField(t, err, "toplevel = ", fmt.Sprintf("%q", p))
			must.StrContains(t, err.Error(), "must be a Nix store path")
		})
	}
}

// A well-formed store path passes, without trailing slashes; whether it is a NixOS system is
// checked once it is in the store.
func TestValidateToplevel_WellFormed(t *testing.T) {
	for p, want := range map[string]string{
		absentToplevel:        absentToplevel,
		absentToplevel + "/":  absentToplevel,
		absentToplevel + "//": absentToplevel,
		"/nix/store/abcdfghijklmnpqrsvwxyz0123456789-nixos-system-x_1.2+3?=": "/nix/store/abcdfghijklmnpqrsvwxyz0123456789-nixos-system-x_1.2+3?=",
	} {
		got, err := validateToplevel(p)
		must.NoError(t, err)
		must.EqOp(t, want, got)
	}
	tc := validTaskConfig()
	tc.Toplevel = absentToplevel + "/"
	_, err := tc.validate()
	must.NoError(t, err)
	must.EqOp(t, absentToplevel, tc.Toplevel)
}

// A link (a profile, a result link) is refused with what to give instead; other paths say why
// they are not store paths.
func TestValidateToplevel_Explained(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "system")
	must.NoError(t, os.Mkdir(target, 0o755))
	link := filepath.Join(dir, "web")
	must.NoError(t, os.Symlink(target, link))
	for _, p := range []string{link, link + "/"} {
		_, err := validateToplevel(p)
		must.ErrorContains(t, err, fmt.Sprintf("toplevel = %q: a symbolic link, and the driver does not follow links; give the store path it points to, as `readlink -f %s` prints it, here %s", p, link, target))
	}
	_, err := validateToplevel("/nix/var/nix/profiles/does-not-exist")
	must.ErrorContains(t, err, `toplevel = "/nix/var/nix/profiles/does-not-exist": must be a Nix store path: "/nix/var/nix/profiles/does-not-exist" is not in /nix/store`)
	_, err = validateToplevel(absentToplevel + "/sw")
	must.ErrorContains(t, err, "is inside the store path "+absentToplevel+", not a store path itself")
	_, err = validateToplevel("/nix/store/0c7hkqjx3pb2xvdm0ncvb8hgxwqbb1p-web")
	must.ErrorContains(t, err, "must start with a 32-character Nix base32 hash")
}

func validTaskConfig() TaskConfig {
	return TaskConfig{
		Toplevel:     absentToplevel,
		ReadyTimeout: "90s",
		PrivateUsers: "pick",
		RebootPolicy: "exit",
	}
}

func TestTaskConfigOptions_OK(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*TaskConfig)
		want   taskOptions
	}{
		{"defaults", func(*TaskConfig) {}, taskOptions{90 * time.Second, "pick", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"ready_timeout 2m", func(c *TaskConfig) { c.ReadyTimeout = "2m" }, taskOptions{2 * time.Minute, "pick", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"ready_timeout 1h is the maximum", func(c *TaskConfig) { c.ReadyTimeout = "1h" }, taskOptions{time.Hour, "pick", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"ready_timeout 1ms", func(c *TaskConfig) { c.ReadyTimeout = "1ms" }, taskOptions{time.Millisecond, "pick", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"private_users range", func(c *TaskConfig) { c.PrivateUsers = "524288:65536" }, taskOptions{90 * time.Second, "524288:65536", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"private_users base only", func(c *TaskConfig) { c.PrivateUsers = "524288" }, taskOptions{90 * time.Second, "524288:65536", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"private_users normalized", func(c *TaskConfig) { c.PrivateUsers = "0524288:065536" }, taskOptions{90 * time.Second, "524288:65536", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"private_users last range", func(c *TaskConfig) { c.PrivateUsers = "1878982656" }, taskOptions{90 * time.Second, "1878982656:65536", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"reboot_policy restart", func(c *TaskConfig) { c.RebootPolicy = "restart" }, taskOptions{90 * time.Second, "pick", nspawn.RebootRestart, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"network_mode none", func(c *TaskConfig) { c.NetworkMode = "none" }, taskOptions{90 * time.Second, "pick", nspawn.RebootExit, nspawn.NetworkNone, "closure", nil, nspawn.Privileges{}, nil}},
		{"network_mode host", func(c *TaskConfig) { c.NetworkMode = "host" }, taskOptions{90 * time.Second, "pick", nspawn.RebootExit, nspawn.NetworkHost, "closure", nil, nspawn.Privileges{}, nil}},
		{"host_bridge with veth", func(c *TaskConfig) { c.HostBridge = "br0" }, taskOptions{90 * time.Second, "pick", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"init_args", func(c *TaskConfig) { c.InitArgs = []string{"systemd.unit=rescue.target", "a b", "--"} }, taskOptions{90 * time.Second, "pick", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, nil}},
		{"credentials, sorted by name", func(c *TaskConfig) {
			c.Credentials = []map[string]string{{"tls.key": "secrets/tls/server.key", "db-password": "db-password"}}
		}, taskOptions{90 * time.Second, "pick", nspawn.RebootExit, nspawn.NetworkVeth, "closure", nil, nspawn.Privileges{}, []nspawn.CredentialSource{
			{Name: "db-password", File: "db-password"}, {Name: "tls.key", File: "tls/server.key"},
		}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tc := validTaskConfig()
			c.mutate(&tc)
			got, err := tc.options()
			must.NoError(t, err)
			must.Eq(t, c.want, got)
		})
	}
}

func TestTaskConfigOptions_Errors(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*TaskConfig)
		field  string
		value  string
	}{
		{"ready_timeout 0s", func(c *TaskConfig) { c.ReadyTimeout = "0s" }, "ready_timeout", `"0s"`},
		{"ready_timeout negative", func(c *TaskConfig) { c.ReadyTimeout = "-1s" }, "ready_timeout", `"-1s"`},
		{"ready_timeout above an hour", func(c *TaskConfig) { c.ReadyTimeout = "2h" }, "ready_timeout", `"2h"`},
		{"ready_timeout not a duration", func(c *TaskConfig) { c.ReadyTimeout = "abc" }, "ready_timeout", `"abc"`},
		{"ready_timeout without unit", func(c *TaskConfig) { c.ReadyTimeout = "90" }, "ready_timeout", `"90"`},
		{"ready_timeout empty", func(c *TaskConfig) { c.ReadyTimeout = "" }, "ready_timeout", `""`},
		{"private_users no", func(c *TaskConfig) { c.PrivateUsers = "no" }, "private_users", `"no"`},
		{"private_users identity", func(c *TaskConfig) { c.PrivateUsers = "identity" }, "private_users", `"identity"`},
		{"private_users yes", func(c *TaskConfig) { c.PrivateUsers = "yes" }, "private_users", `"yes"`},
		{"private_users empty", func(c *TaskConfig) { c.PrivateUsers = "" }, "private_users", `""`},
		{"private_users host range", func(c *TaskConfig) { c.PrivateUsers = "0:65536" }, "private_users", `"0:65536"`},
		{"private_users below the container ranges", func(c *TaskConfig) { c.PrivateUsers = "458752:65536" }, "private_users", `"458752:65536"`},
		{"private_users unaligned", func(c *TaskConfig) { c.PrivateUsers = "524289:65536" }, "private_users", `"524289:65536"`},
		{"private_users small size", func(c *TaskConfig) { c.PrivateUsers = "524288:1000" }, "private_users", `"524288:1000"`},
		{"private_users large size", func(c *TaskConfig) { c.PrivateUsers = "524288:131072" }, "private_users", `"524288:131072"`},
		{"private_users beyond the container ranges", func(c *TaskConfig) { c.PrivateUsers = "1879048192:65536" }, "private_users", `"1879048192:65536"`},
		{"private_users negative", func(c *TaskConfig) { c.PrivateUsers = "-524288:65536" }, "private_users", `"-524288:65536"`},
		{"private_users empty size", func(c *TaskConfig) { c.PrivateUsers = "524288:" }, "private_users", `"524288:"`},
		{"private_users overflow", func(c *TaskConfig) { c.PrivateUsers = "4295491584:65536" }, "private_users", `"4295491584:65536"`},
		{"reboot_policy reboot", func(c *TaskConfig) { c.RebootPolicy = "reboot" }, "reboot_policy", `"reboot"`},
		{"reboot_policy empty", func(c *TaskConfig) { c.RebootPolicy = "" }, "reboot_policy", `""`},
		{"reboot_policy upper case", func(c *TaskConfig) { c.RebootPolicy = "Exit" }, "reboot_policy", `"Exit"`},
		{"init_args NUL", func(c *TaskConfig) { c.InitArgs = []string{"ok", "a\x00b"} }, "init_args[1]", `"a\x00b"`},
		{"init_args newline", func(c *TaskConfig) { c.InitArgs = []string{"a\nb"} }, "init_args[0]", `"a\nb"`},
		{"binary_cache absolute", func(c *TaskConfig) { c.BinaryCache = "/etc" }, "binary_cache", `"/etc"`},
		{"binary_cache escaping", func(c *TaskConfig) { c.BinaryCache = "local/../../x" }, "binary_cache", `"local/../../x"`},
		{"export escaping", func(c *TaskConfig) { c.Export = "../closure" }, "export", `"../closure"`},
		{"binary_cache and export", func(c *TaskConfig) { c.BinaryCache, c.Export = "local/c", "local/e" }, "binary_cache", `"local/c"`},
		{"substituter of no known kind", func(c *TaskConfig) { c.Substituters = []string{"ftp://srv/cache"} }, "substituters[0]", `"ftp://srv/cache"`},
		{"substituter with user", func(c *TaskConfig) { c.Substituters = []string{"https://a:b@cache"} }, "substituters[0]", `"https://a:xxxxx@cache" must be a binary cache URL without user`},
		{"store_view all", func(c *TaskConfig) { c.StoreView = "all" }, "store_view", `"all"`},
		{"empty port label", func(c *TaskConfig) { c.Ports = []string{"http", ""} }, "ports[1]", `""`},
		{"credential name with a colon", func(c *TaskConfig) { c.Credentials = []map[string]string{{"a:b": "x"}} }, "credentials name", `"a:b"`},
		{"credential name with a slash", func(c *TaskConfig) { c.Credentials = []map[string]string{{"a/b": "x"}} }, "credentials name", `"a/b"`},
		{"credential file escaping", func(c *TaskConfig) { c.Credentials = []map[string]string{{"db": "../local/x"}} }, "credentials.db", `"../local/x"`},
		{"credential file absolute", func(c *TaskConfig) { c.Credentials = []map[string]string{{"db": "/etc/shadow"}} }, "credentials.db", `"/etc/shadow"`},
		{"credential given twice", func(c *TaskConfig) { c.Credentials = []map[string]string{{"db": "a"}, {"db": "b"}} }, "credentials name", `"db": given twice`},
		{"credential file empty", func(c *TaskConfig) { c.Credentials = []map[string]string{{"db": ""}} }, "credentials.db", `""`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tc := validTaskConfig()
			c.mutate(&tc)
			_, err := tc.options()
			mustNameField(t, err, c.field+" = ", c.value)
		})
	}
}

// validate checks the toplevel before anything else, and reports the toplevel.
func TestTaskConfigValidate(t *testing.T) {
	tc := validTaskConfig()
	tc.Toplevel = "/nix/store/not-a-store-path"
	tc.ReadyTimeout = "abc"
	_, err := tc.validate()
	mustNameField(t, err, "toplevel = ", `"/nix/store/not-a-store-path"`)

	tc = validTaskConfig()
	_, err = tc.validate()
	must.NoError(t, err)
}

func TestTaskConfigSchema_Defaults(t *testing.T) {
	var tc TaskConfig
	hclutils.NewConfigParser(taskConfigSpec).ParseHCL(t, `config {
  toplevel = "`+absentToplevel+`"
}`, &tc)
	must.Eq(t, TaskConfig{
		Toplevel:     absentToplevel,
		ReadyTimeout: "2m",
		PrivateUsers: "pick",
		RebootPolicy: "exit",
		StoreView:    "closure",
	}, tc)
	// The defaults are themselves valid.
	o, err := tc.options()
	must.NoError(t, err)
	must.EqOp(t, 2*time.Minute, o.readyTimeout)
}

func TestTaskConfigSchema_AllFields(t *testing.T) {
	var tc TaskConfig
	hclutils.NewConfigParser(taskConfigSpec).ParseHCL(t, `config {
  toplevel      = "`+absentToplevel+`"
  init_args     = ["systemd.unit=rescue.target", "quiet"]
  ready_timeout = "30s"
  private_users = "524288:65536"
  reboot_policy = "restart"
  network_mode  = "veth"
  host_bridge   = "br0"
  binary_cache  = "local/cache"
  substituters  = ["https://cache.example.org"]
  store_view    = "host"
}`, &tc)
	must.Eq(t, TaskConfig{
		Toplevel:     absentToplevel,
		InitArgs:     []string{"systemd.unit=rescue.target", "quiet"},
		ReadyTimeout: "30s",
		PrivateUsers: "524288:65536",
		RebootPolicy: "restart",
		NetworkMode:  "veth",
		HostBridge:   "br0",
		BinaryCache:  "local/cache",
		Substituters: []string{"https://cache.example.org"},
		StoreView:    "host",
	}, tc)
	var exp TaskConfig
	hclutils.NewConfigParser(taskConfigSpec).ParseHCL(t, `config {
  toplevel = "`+absentToplevel+`"
  export   = "local/system.closure"
}`, &exp)
	must.EqOp(t, "local/system.closure", exp.Export)
}

func TestPluginConfigSchema_Defaults(t *testing.T) {
	var pc PluginConfig
	hclutils.NewConfigParser(pluginConfigSpec).ParseHCL(t, "config {\n}", &pc)
	must.Eq(t, PluginConfig{
		Enabled:             true,
		DataDir:             "/var/lib/nomad-driver-nixos",
		Slice:               "machine.slice",
		TasksMax:            16384,
		Store:               "auto",
		GCGrace:             "1h",
		BearerTokens:        []BearerToken{},
		MaxSubstitutionJobs: 16,
		AddressPool:         "10.235.0.0/16",
		AddressPoolIPv6:     "fd35:6e78:6f73::/48",
		ConsoleBacklog:      "1GiB",
		CNIPath:             "/opt/cni/bin:/usr/lib/cni",
	}, pc)
	must.NoError(t, pc.validate())
}

func TestPluginConfigSchema_AllFields(t *testing.T) {
	secrets := t.TempDir()
	for name, content := range map[string]string{
		"netrc":           "machine attic.example.org login ci password tok\n",
		"attic-token":     "tok\n",
		"aws-credentials": "[default]\naws_access_key_id = AKIA\naws_secret_access_key = s\n",
	} {
		must.NoError(t, os.WriteFile(filepath.Join(secrets, name), []byte(content), 0o600))
	}
	var pc PluginConfig
	hclutils.NewConfigParser(pluginConfigSpec).ParseHCL(t, strings.ReplaceAll(`config {
  enabled          = false
  data_dir         = "/srv/machines"
  nspawn_path      = "/opt/bin/systemd-nspawn"
  systemd_run_path = "/opt/bin/systemd-run"
  slice            = "nomad-machines.slice"
  tasks_max        = 0
  allow_host_network = true
  store            = "driver"
  nix_store_path   = "/opt/bin/nix-store"
  trusted_public_keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
  substituters     = ["https://cache.example.org"]
  trusted_substituters = ["https://ci.example.org", "https://attic.example.org/ci?priority=10"]
  allow_unsigned   = true
  netrc_file       = "SECRETS/netrc"
  bearer_token {
    cache = "https://attic.example.org/ci"
    file  = "SECRETS/attic-token"
  }
  aws_credentials_file  = "SECRETS/aws-credentials"
  max_substitution_jobs = 4
  gc_grace         = "10m"
  console_backlog  = "64MiB"
  cni_path         = "/usr/lib/cni"
}`, "SECRETS", secrets), &pc)
	must.Eq(t, PluginConfig{
		Enabled:             false,
		DataDir:             "/srv/machines",
		NspawnPath:          "/opt/bin/systemd-nspawn",
		SystemdRunPath:      "/opt/bin/systemd-run",
		Slice:               "nomad-machines.slice",
		TasksMax:            0,
		AllowHostNetwork:    true,
		Store:               "driver",
		NixStorePath:        "/opt/bin/nix-store",
		TrustedPublicKeys:   []string{"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="},
		Substituters:        []string{"https://cache.example.org"},
		TrustedSubstituters: []string{"https://ci.example.org", "https://attic.example.org/ci?priority=10"},
		AllowUnsigned:       true,
		NetrcFile:           secrets + "/netrc",
		BearerTokens:        []BearerToken{{Cache: "https://attic.example.org/ci", File: secrets + "/attic-token"}},
		AWSCredentialsFile:  secrets + "/aws-credentials",
		GCGrace:             "10m",
		MaxSubstitutionJobs: 4,
		AddressPool:         "10.235.0.0/16",
		AddressPoolIPv6:     "fd35:6e78:6f73::/48",
		ConsoleBacklog:      "64MiB",
		CNIPath:             "/usr/lib/cni",
	}, pc)
	must.NoError(t, pc.validate())
	must.EqOp(t, 10*time.Minute, pc.gcGrace)
	must.EqOp(t, 64<<20, pc.consoleBacklog)
	must.Eq(t, 1, len(pc.keys))
}

func TestPluginConfigValidate_CacheAccess(t *testing.T) {
	dir := t.TempDir()
	secret := "attic-tok-8c1d"
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		must.NoError(t, os.WriteFile(p, []byte(content), 0o600))
		return p
	}
	token := write("token", secret+"\n")
	netrc := write("netrc", "machine attic.example.org login ci password "+secret+"\n")
	badNetrc := write("bad-netrc", "machine attic.example.org login ci pasword "+secret+"\n")
	empty := write("empty", "\n")
	creds := write("aws", "[default]\naws_access_key_id = AKIA\naws_secret_access_key = "+secret+"\n")
	base := func() PluginConfig {
		pc := validPluginConfig()
		pc.Substituters = []string{"https://attic.example.org/ci?priority=10", "s3://nix?region=eu-west-1"}
		return pc
	}

	pc := base()
	pc.NetrcFile, pc.AWSCredentialsFile = netrc, creds
	pc.BearerTokens = []BearerToken{{Cache: "https://attic.example.org/ci/", File: token}}
	must.NoError(t, pc.validate())
	must.Eq(t, map[string]string{"https://attic.example.org/ci": token}, pc.cacheConfig.BearerTokenFiles)
	must.Eq(t, 16, pc.cacheConfig.Connections)

	for _, c := range []struct {
		name   string
		mutate func(*PluginConfig)
		want   string
	}{
		{"relative netrc_file", func(c *PluginConfig) { c.NetrcFile = "netrc" }, `netrc_file = "netrc": must be an absolute path`},
		{"missing netrc_file", func(c *PluginConfig) { c.NetrcFile = dir + "/none" }, `netrc_file = "` + dir + `/none": open`},
		{"bad netrc_file", func(c *PluginConfig) { c.NetrcFile = badNetrc }, "line 1: unknown netrc keyword"},
		{"relative aws_credentials_file", func(c *PluginConfig) { c.AWSCredentialsFile = "aws" }, `aws_credentials_file = "aws": must be an absolute path`},
		{"token for an unlisted cache", func(c *PluginConfig) {
			c.BearerTokens = []BearerToken{{Cache: "https://evil.example.org", File: token}}
		}, `bearer_token[0].cache = "https://evil.example.org": must name a cache of substituters or trusted_substituters`},
		{"token for s3", func(c *PluginConfig) {
			c.BearerTokens = []BearerToken{{Cache: "s3://nix?region=eu-west-1", File: token}}
		}, "only http:// and https:// caches take a bearer token"},
		{"two tokens for a cache", func(c *PluginConfig) {
			c.BearerTokens = []BearerToken{{Cache: "https://attic.example.org/ci", File: token}, {Cache: "https://attic.example.org/ci/", File: token}}
		}, `bearer_token[1].cache = "https://attic.example.org/ci/": the cache has a bearer_token block already`},
		{"relative token file", func(c *PluginConfig) {
			c.BearerTokens = []BearerToken{{Cache: "https://attic.example.org/ci", File: "token"}}
		}, `bearer_token[0].file = "token": must be an absolute path`},
		{"empty token file", func(c *PluginConfig) {
			c.BearerTokens = []BearerToken{{Cache: "https://attic.example.org/ci", File: empty}}
		}, "must hold one token on one line"},
		{"max_substitution_jobs too high", func(c *PluginConfig) { c.MaxSubstitutionJobs = 1000 }, "max_substitution_jobs = 1000: must be between 1 and 256"},
		{"max_substitution_jobs negative", func(c *PluginConfig) { c.MaxSubstitutionJobs = -1 }, "max_substitution_jobs = -1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			pc := base()
			c.mutate(&pc)
			err := pc.validate()
			must.ErrorContains(t, err, c.want)
			must.StrNotContains(t, err.Error(), secret)
		})
	}
}

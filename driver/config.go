// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/shared/hclspec"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

const (
	defaultDataDir      = "/var/lib/nomad-driver-nixos"
	defaultSlice        = "machine.slice"
	defaultTasksMax     = 16384
	defaultReadyTimeout = "2m"
	maxReadyTimeout     = time.Hour
	// nixosSystemBin is where NixOS keeps system tools; its Nomad unit does not have it in PATH.
	nixosSystemBin = "/run/current-system/sw/bin"
)

var pluginConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"enabled":            hclspec.NewDefault(hclspec.NewAttr("enabled", "bool", false), hclspec.NewLiteral("true")),
	"data_dir":           hclspec.NewDefault(hclspec.NewAttr("data_dir", "string", false), hclspec.NewLiteral(strconv.Quote(defaultDataDir))),
	"nspawn_path":        hclspec.NewAttr("nspawn_path", "string", false),
	"systemd_run_path":   hclspec.NewAttr("systemd_run_path", "string", false),
	"journalctl_path":    hclspec.NewAttr("journalctl_path", "string", false),
	"nsenter_path":       hclspec.NewAttr("nsenter_path", "string", false),
	"slice":              hclspec.NewDefault(hclspec.NewAttr("slice", "string", false), hclspec.NewLiteral(strconv.Quote(defaultSlice))),
	"tasks_max":          hclspec.NewDefault(hclspec.NewAttr("tasks_max", "number", false), hclspec.NewLiteral(strconv.Itoa(defaultTasksMax))),
	"allow_host_network": hclspec.NewDefault(hclspec.NewAttr("allow_host_network", "bool", false), hclspec.NewLiteral("false")),
})

var taskConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"toplevel":      hclspec.NewAttr("toplevel", "string", true),
	"init_args":     hclspec.NewAttr("init_args", "list(string)", false),
	"ready_timeout": hclspec.NewDefault(hclspec.NewAttr("ready_timeout", "string", false), hclspec.NewLiteral(strconv.Quote(defaultReadyTimeout))),
	"private_users": hclspec.NewDefault(hclspec.NewAttr("private_users", "string", false), hclspec.NewLiteral(`"pick"`)),
	"reboot_policy": hclspec.NewDefault(hclspec.NewAttr("reboot_policy", "string", false), hclspec.NewLiteral(`"exit"`)),
	"network_mode":  hclspec.NewDefault(hclspec.NewAttr("network_mode", "string", false), hclspec.NewLiteral(`"veth"`)),
	"host_bridge":   hclspec.NewAttr("host_bridge", "string", false),
})

// PluginConfig is the plugin block of the Nomad agent configuration.
type PluginConfig struct {
	Enabled        bool   `codec:"enabled"`
	DataDir        string `codec:"data_dir"`
	NspawnPath     string `codec:"nspawn_path"`
	SystemdRunPath string `codec:"systemd_run_path"`
	JournalctlPath string `codec:"journalctl_path"`
	NsenterPath    string `codec:"nsenter_path"`
	Slice          string `codec:"slice"`
	TasksMax       int64  `codec:"tasks_max"`
	// AllowHostNetwork lets tasks share the host's network namespace (network_mode = "host").
	AllowHostNetwork bool `codec:"allow_host_network"`
}

// TaskConfig is the config block of a task.
type TaskConfig struct {
	Toplevel     string   `codec:"toplevel"`
	InitArgs     []string `codec:"init_args"`
	ReadyTimeout string   `codec:"ready_timeout"`
	PrivateUsers string   `codec:"private_users"`
	RebootPolicy string   `codec:"reboot_policy"`
	NetworkMode  string   `codec:"network_mode"`
	HostBridge   string   `codec:"host_bridge"`
}

// ifName is what Linux accepts as an interface name, without the characters ip(8) treats specially.
var ifName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)

var sliceName = regexp.MustCompile(`^[A-Za-z0-9:_.\\-]+\.slice$`)

// validate checks the plugin config and fills in tool paths that were left out.
func (c *PluginConfig) validate() error {
	if !filepath.IsAbs(c.DataDir) || filepath.Clean(c.DataDir) == "/" || strings.ContainsAny(c.DataDir, "'$:\\\n\x00") {
		return fmt.Errorf("data_dir = %q: must be an absolute path other than /, without quotes, '$', ':', '\\' or control characters", c.DataDir)
	}
	c.DataDir = filepath.Clean(c.DataDir)
	if !sliceName.MatchString(c.Slice) {
		return fmt.Errorf("slice = %q: must be a systemd slice unit name such as %q", c.Slice, defaultSlice)
	}
	if c.TasksMax < 0 {
		return fmt.Errorf("tasks_max = %d: must be 0 (no limit) or positive", c.TasksMax)
	}
	for _, t := range []struct {
		field, name string
		path        *string
	}{
		{"nspawn_path", "systemd-nspawn", &c.NspawnPath},
		{"systemd_run_path", "systemd-run", &c.SystemdRunPath},
		{"journalctl_path", "journalctl", &c.JournalctlPath},
		{"nsenter_path", "nsenter", &c.NsenterPath},
	} {
		if *t.path == "" {
			*t.path = findTool(t.name)
			continue
		}
		if !filepath.IsAbs(*t.path) {
			return fmt.Errorf("%s = %q: must be an absolute path to %s", t.field, *t.path, t.name)
		}
	}
	return nil
}

// findTool looks in PATH, then where NixOS keeps it. Not finding it is reported by the fingerprint.
func findTool(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		if abs, err := filepath.Abs(p); err == nil {
			return abs
		}
	}
	return filepath.Join(nixosSystemBin, name)
}

// storePath is a Nix store path: /nix/store/<32 nixbase32 chars>-<name>.
var storePath = regexp.MustCompile(`^/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+$`)

// taskOptions is a validated task config.
type taskOptions struct {
	readyTimeout time.Duration
	privateUsers string
	rebootPolicy nspawn.RebootPolicy
	networkMode  string
}

// validate checks the task config; it runs after Nomad's interpolation, so it sees the values
// the machine would get.
func (c *TaskConfig) validate() (taskOptions, error) {
	if err := validateToplevel(c.Toplevel); err != nil {
		return taskOptions{}, err
	}
	return c.options()
}

// options checks and parses everything but the toplevel, which a recovered task need not recheck.
func (c *TaskConfig) options() (taskOptions, error) {
	var o taskOptions
	for i, a := range c.InitArgs {
		if strings.ContainsAny(a, "\x00\n") {
			return o, fmt.Errorf("init_args[%d] = %q: must not contain NUL or newline characters", i, a)
		}
	}
	d, err := time.ParseDuration(c.ReadyTimeout)
	if err != nil || d <= 0 || d > maxReadyTimeout {
		return o, fmt.Errorf("ready_timeout = %q: must be a duration such as \"90s\", above 0 and at most %s", c.ReadyTimeout, maxReadyTimeout)
	}
	o.readyTimeout = d
	if o.privateUsers, err = validatePrivateUsers(c.PrivateUsers); err != nil {
		return o, err
	}
	switch c.NetworkMode {
	case nspawn.NetworkVeth, nspawn.NetworkNone, nspawn.NetworkHost:
		o.networkMode = c.NetworkMode
	case "":
		o.networkMode = nspawn.NetworkVeth
	default:
		return o, fmt.Errorf("network_mode = %q: must be %q (own namespace with a veth link), %q (loopback only) or %q (the host's network, if the plugin config allows it)", c.NetworkMode, nspawn.NetworkVeth, nspawn.NetworkNone, nspawn.NetworkHost)
	}
	if c.HostBridge != "" && !ifName.MatchString(c.HostBridge) {
		return o, fmt.Errorf("host_bridge = %q: must be a network interface name of 1 to 15 letters, digits, '.', '_' or '-'", c.HostBridge)
	}
	if c.HostBridge != "" && o.networkMode != nspawn.NetworkVeth {
		return o, fmt.Errorf("host_bridge = %q: only with network_mode = %q, not %q", c.HostBridge, nspawn.NetworkVeth, o.networkMode)
	}
	switch p := nspawn.RebootPolicy(c.RebootPolicy); p {
	case nspawn.RebootExit, nspawn.RebootRestart:
		o.rebootPolicy = p
	default:
		return o, fmt.Errorf("reboot_policy = %q: must be %q (a guest reboot ends the task with exit code 133) or %q (the machine boots again in place)", c.RebootPolicy, nspawn.RebootExit, nspawn.RebootRestart)
	}
	return o, nil
}

// validateToplevel checks that path is a NixOS system built for containers and present here.
func validateToplevel(path string) error {
	if !storePath.MatchString(path) {
		return fmt.Errorf("toplevel = %q: must be a Nix store path like /nix/store/<32-character hash>-nixos-system-<name>", path)
	}
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("toplevel = %q: no such store path on this host", path)
	}
	if err != nil {
		return fmt.Errorf("toplevel = %q: %w", path, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("toplevel = %q: must be the directory of a NixOS system (found %s)", path, fi.Mode().Type())
	}
	initFi, err := os.Stat(filepath.Join(path, "init"))
	if err != nil || initFi.IsDir() || initFi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("toplevel = %q: not a NixOS system closure: it has no executable init", path)
	}
	if _, err := os.Lstat(filepath.Join(path, "kernel")); err == nil {
		return fmt.Errorf("toplevel = %q: has a kernel, so it is a NixOS system for a VM or bare metal; build it with boot.isNspawnContainer = true", path)
	}
	return nil
}

// nspawn's picked ranges start at 0x80000 and are 64 Ki UIDs wide (systemd docs/UIDS-GIDS.md).
const (
	userRangeSize  = 65536
	userRangeFirst = 0x80000
	userRangeLast  = 0x6FFF0000
)

func validatePrivateUsers(v string) (string, error) {
	if v == "pick" {
		return v, nil
	}
	base, size, hasSize := strings.Cut(v, ":")
	b, err := strconv.ParseUint(base, 10, 32)
	s := uint64(userRangeSize)
	if err == nil && hasSize {
		s, err = strconv.ParseUint(size, 10, 32)
	}
	if err != nil || b%userRangeSize != 0 || b < userRangeFirst || b > userRangeLast || s != userRangeSize {
		return "", fmt.Errorf("private_users = %q: must be \"pick\" or a range \"BASE:65536\" with BASE a multiple of 65536 between %d and %d; machines always run in a user namespace", v, userRangeFirst, userRangeLast)
	}
	return fmt.Sprintf("%d:%d", b, s), nil
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/shared/hclspec"

	"github.com/nomad-nixos/nomad-driver-nixos/closure"
	"github.com/nomad-nixos/nomad-driver-nixos/console"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

const (
	defaultDataDir      = "/var/lib/nomad-driver-nixos"
	defaultSlice        = "machine.slice"
	defaultTasksMax     = 16384
	defaultReadyTimeout = "2m"
	defaultGCGrace      = "1h"
	maxSubstitutionJobs = 256
	// defaultConsoleBacklog bounds the disk a machine's undelivered console may take.
	defaultConsoleBacklog = "1GiB"
	maxReadyTimeout       = time.Hour
	// nixosSystemBin is where NixOS keeps system tools; its Nomad unit does not have it in PATH.
	nixosSystemBin = "/run/current-system/sw/bin"
)

var pluginConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"enabled":              hclspec.NewDefault(hclspec.NewAttr("enabled", "bool", false), hclspec.NewLiteral("true")),
	"data_dir":             hclspec.NewDefault(hclspec.NewAttr("data_dir", "string", false), hclspec.NewLiteral(strconv.Quote(defaultDataDir))),
	"nspawn_path":          hclspec.NewAttr("nspawn_path", "string", false),
	"systemd_run_path":     hclspec.NewAttr("systemd_run_path", "string", false),
	"nsenter_path":         hclspec.NewAttr("nsenter_path", "string", false),
	"slice":                hclspec.NewDefault(hclspec.NewAttr("slice", "string", false), hclspec.NewLiteral(strconv.Quote(defaultSlice))),
	"tasks_max":            hclspec.NewDefault(hclspec.NewAttr("tasks_max", "number", false), hclspec.NewLiteral(strconv.Itoa(defaultTasksMax))),
	"allow_host_network":   hclspec.NewDefault(hclspec.NewAttr("allow_host_network", "bool", false), hclspec.NewLiteral("false")),
	"store":                hclspec.NewDefault(hclspec.NewAttr("store", "string", false), hclspec.NewLiteral(`"auto"`)),
	"nix_store_path":       hclspec.NewAttr("nix_store_path", "string", false),
	"trusted_public_keys":  hclspec.NewAttr("trusted_public_keys", "list(string)", false),
	"substituters":         hclspec.NewAttr("substituters", "list(string)", false),
	"trusted_substituters": hclspec.NewAttr("trusted_substituters", "list(string)", false),
	"allow_unsigned":       hclspec.NewDefault(hclspec.NewAttr("allow_unsigned", "bool", false), hclspec.NewLiteral("false")),
	"netrc_file":           hclspec.NewAttr("netrc_file", "string", false),
	"bearer_token": hclspec.NewBlockList("bearer_token", hclspec.NewObject(map[string]*hclspec.Spec{
		"cache": hclspec.NewAttr("cache", "string", true),
		"file":  hclspec.NewAttr("file", "string", true),
	})),
	"aws_credentials_file":  hclspec.NewAttr("aws_credentials_file", "string", false),
	"max_substitution_jobs": hclspec.NewDefault(hclspec.NewAttr("max_substitution_jobs", "number", false), hclspec.NewLiteral(strconv.Itoa(closure.DefaultJobs))),
	"gc_grace":              hclspec.NewDefault(hclspec.NewAttr("gc_grace", "string", false), hclspec.NewLiteral(strconv.Quote(defaultGCGrace))),
	"address_pool":          hclspec.NewDefault(hclspec.NewAttr("address_pool", "string", false), hclspec.NewLiteral(strconv.Quote(defaultAddressPool))),
	"address_pool_ipv6":     hclspec.NewDefault(hclspec.NewAttr("address_pool_ipv6", "string", false), hclspec.NewLiteral(strconv.Quote(defaultAddressPoolIPv6))),
	"console_backlog":       hclspec.NewDefault(hclspec.NewAttr("console_backlog", "string", false), hclspec.NewLiteral(strconv.Quote(defaultConsoleBacklog))),
	"allow_caps":            hclspec.NewAttr("allow_caps", "list(string)", false),
	"allow_system_calls":    hclspec.NewAttr("allow_system_calls", "list(string)", false),
	"allow_devices":         hclspec.NewAttr("allow_devices", "list(string)", false),
	"allow_bind_paths":      hclspec.NewAttr("allow_bind_paths", "list(string)", false),
	"cni_path":              hclspec.NewDefault(hclspec.NewAttr("cni_path", "string", false), hclspec.NewLiteral(strconv.Quote(defaultCNIPath))),
})

var taskConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"toplevel":      hclspec.NewAttr("toplevel", "string", true),
	"init_args":     hclspec.NewAttr("init_args", "list(string)", false),
	"ready_timeout": hclspec.NewDefault(hclspec.NewAttr("ready_timeout", "string", false), hclspec.NewLiteral(strconv.Quote(defaultReadyTimeout))),
	"private_users": hclspec.NewDefault(hclspec.NewAttr("private_users", "string", false), hclspec.NewLiteral(`"pick"`)),
	"reboot_policy": hclspec.NewDefault(hclspec.NewAttr("reboot_policy", "string", false), hclspec.NewLiteral(`"exit"`)),
	// No default: a bridge-mode group must tell a network_mode the task set from none.
	"network_mode":       hclspec.NewAttr("network_mode", "string", false),
	"host_bridge":        hclspec.NewAttr("host_bridge", "string", false),
	"binary_cache":       hclspec.NewAttr("binary_cache", "string", false),
	"export":             hclspec.NewAttr("export", "string", false),
	"substituters":       hclspec.NewAttr("substituters", "list(string)", false),
	"store_view":         hclspec.NewDefault(hclspec.NewAttr("store_view", "string", false), hclspec.NewLiteral(`"closure"`)),
	"ports":              hclspec.NewAttr("ports", "list(string)", false),
	"cap_add":            hclspec.NewAttr("cap_add", "list(string)", false),
	"cap_drop":           hclspec.NewAttr("cap_drop", "list(string)", false),
	"system_call_filter": hclspec.NewAttr("system_call_filter", "list(string)", false),
	"no_new_privileges":  hclspec.NewAttr("no_new_privileges", "bool", false),
	// A list of maps, as Nomad hands a jobspec's map to a driver: `credentials = { ... }` arrives
	// as one map in a list.
	"credentials": hclspec.NewAttr("credentials", "list(map(string))", false),
	"devices":     hclspec.NewAttr("devices", "list(string)", false),
	"binds":       hclspec.NewAttr("binds", "list(string)", false),
})

// PluginConfig is the plugin block of the Nomad agent configuration.
type PluginConfig struct {
	Enabled        bool   `codec:"enabled"`
	DataDir        string `codec:"data_dir"`
	NspawnPath     string `codec:"nspawn_path"`
	SystemdRunPath string `codec:"systemd_run_path"`
	NsenterPath    string `codec:"nsenter_path"`
	Slice          string `codec:"slice"`
	TasksMax       int64  `codec:"tasks_max"`
	// AllowHostNetwork lets tasks share the host's network namespace (network_mode = "host").
	AllowHostNetwork bool `codec:"allow_host_network"`
	// Store is "auto", "host" (the host's Nix store) or "driver" (a store under data_dir).
	Store        string `codec:"store"`
	NixStorePath string `codec:"nix_store_path"`
	// TrustedPublicKeys are nix.conf-style "name:base64" keys; a fetched path needs a signature by one.
	TrustedPublicKeys []string `codec:"trusted_public_keys"`
	// Substituters are binary caches every task may be fetched from, after the task's own.
	Substituters []string `codec:"substituters"`
	// TrustedSubstituters are further binary caches a task may name in its own substituters.
	TrustedSubstituters []string `codec:"trusted_substituters"`
	// AllowUnsigned accepts unsigned paths and export streams.
	AllowUnsigned bool `codec:"allow_unsigned"`
	// NetrcFile gives HTTP(S) caches their login and password (Nix's netrc-file format).
	NetrcFile string `codec:"netrc_file"`
	// BearerTokens give caches a token (Authorization: Bearer) from a file.
	BearerTokens []BearerToken `codec:"bearer_token"`
	// AWSCredentialsFile is a shared credentials file for s3:// caches.
	AWSCredentialsFile string `codec:"aws_credentials_file"`
	// MaxSubstitutionJobs bounds the narinfo lookups and NAR transfers of one fetch that run at once.
	MaxSubstitutionJobs int `codec:"max_substitution_jobs"`
	// GCGrace is how long the driver's own store keeps a closure no allocation uses.
	GCGrace string `codec:"gc_grace"`

	// AddressPool and AddressPoolIPv6 are where veth machines' addresses come from; each
	// machine takes a block of four (host, guest). Empty turns a family off.
	AddressPool     string `codec:"address_pool"`
	AddressPoolIPv6 string `codec:"address_pool_ipv6"`

	// ConsoleBacklog is how far Nomad's log reader may fall behind a machine's console before
	// the forwarder drops what it did not deliver (and says so).
	ConsoleBacklog string `codec:"console_backlog"`

	// AllowCaps are the capabilities a guest may have (nspawn's defaults when not given).
	AllowCaps []string `codec:"allow_caps"`
	// AllowSystemCalls are the system calls and @groups a task may add to nspawn's filter.
	AllowSystemCalls []string `codec:"allow_system_calls"`
	// AllowDevices are the host devices a task may name in its devices.
	AllowDevices []string `codec:"allow_devices"`
	// AllowBindPaths are the host directories below which a task may bind paths with binds.
	AllowBindPaths []string `codec:"allow_bind_paths"`
	// CNIPath is where the CNI plugins of Nomad's bridge mode are, as the agent's cni_path:
	// directories separated by ':'.
	CNIPath string `codec:"cni_path"`

	allowCaps           []string
	allowBindPaths      []string
	gcGrace             time.Duration
	consoleBacklog      int64
	keys                closure.TrustedKeys
	pools               pools
	substituters        []closure.CacheURL
	trustedSubstituters []closure.CacheURL
	cacheConfig         closure.CacheConfig
}

// BearerToken is a bearer_token block: the file holding the token of one cache.
type BearerToken struct {
	Cache string `codec:"cache"`
	File  string `codec:"file"`
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
	// BinaryCache is a binary cache directory in the task directory, from an artifact.
	BinaryCache string `codec:"binary_cache"`
	// Export is a nix-store --export stream in the task directory, from an artifact.
	Export       string   `codec:"export"`
	Substituters []string `codec:"substituters"`
	// StoreView is "closure" (only the closure's paths in /nix/store) or "host" (the whole host store).
	StoreView string `codec:"store_view"`
	// Ports are labels of the group's network ports, forwarded from the host into the machine.
	Ports []string `codec:"ports"`
	// CapAdd and CapDrop change the guest's capabilities, within the plugin config's allow_caps.
	CapAdd  []string `codec:"cap_add"`
	CapDrop []string `codec:"cap_drop"`
	// SystemCallFilter adds ("name") or denies ("~name") system calls and @groups.
	SystemCallFilter []string `codec:"system_call_filter"`
	NoNewPrivileges  bool     `codec:"no_new_privileges"`
	// Credentials maps systemd credential names to files of the task's secrets directory.
	Credentials []map[string]string `codec:"credentials"`
	// Devices are host devices bound into the machine, each within the plugin config's allow_devices.
	Devices []string `codec:"devices"`
	// Binds are "HOST:DEST[:ro]", each HOST below a directory of the plugin config's allow_bind_paths.
	Binds []string `codec:"binds"`
}

// ifName is what Linux accepts as an interface name, without the characters ip(8) treats specially.
var ifName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)

var sliceName = regexp.MustCompile(`^[A-Za-z0-9:_.\\-]+\.slice$`)

// validate checks the plugin config and fills in tool paths that were left out.
func (c *PluginConfig) validate() error {
	if err := nspawn.CheckDataDir(c.DataDir); err != nil {
		return fmt.Errorf("data_dir = %q: %w", c.DataDir, err)
	}
	if filepath.Clean(c.DataDir) == "/" {
		return fmt.Errorf("data_dir = %q: must be a directory other than /", c.DataDir)
	}
	c.DataDir = filepath.Clean(c.DataDir)
	if !sliceName.MatchString(c.Slice) {
		return fmt.Errorf("slice = %q: must be a systemd slice unit name such as %q", c.Slice, defaultSlice)
	}
	if c.TasksMax < 0 {
		return fmt.Errorf("tasks_max = %d: must be 0 (no limit) or positive", c.TasksMax)
	}
	switch c.Store {
	case "", storeAuto:
		c.Store = storeAuto
	case closure.KindHost, closure.KindDriver:
	default:
		return fmt.Errorf("store = %q: must be %q (the host's Nix store if it is writable, else the driver's own), %q or %q", c.Store, storeAuto, closure.KindHost, closure.KindDriver)
	}
	var err error
	if c.keys, err = closure.ParseTrustedKeys(c.TrustedPublicKeys); err != nil {
		return err
	}
	if c.substituters, err = closure.ParseCacheURLs("substituters", c.Substituters); err != nil {
		return err
	}
	if c.trustedSubstituters, err = closure.ParseCacheURLs("trusted_substituters", c.TrustedSubstituters); err != nil {
		return err
	}
	if c.cacheConfig, err = c.validateCacheAccess(); err != nil {
		return err
	}
	if c.GCGrace == "" {
		c.GCGrace = defaultGCGrace
	}
	if c.gcGrace, err = time.ParseDuration(c.GCGrace); err != nil || c.gcGrace < 0 {
		return fmt.Errorf("gc_grace = %q: must be a duration such as \"1h\" or \"0s\"", c.GCGrace)
	}
	if c.ConsoleBacklog == "" {
		c.ConsoleBacklog = defaultConsoleBacklog
	}
	if c.consoleBacklog, err = console.ParseSize(c.ConsoleBacklog); err != nil {
		return fmt.Errorf("console_backlog = %w; it bounds how far Nomad's log reader may fall behind a machine's console", err)
	}
	if c.pools, err = parsePools(c.AddressPool, c.AddressPoolIPv6); err != nil {
		return err
	}
	if c.allowCaps, err = parseAllowCaps(c.AllowCaps); err != nil {
		return err
	}
	if err := parseAllowSystemCalls(c.AllowSystemCalls); err != nil {
		return err
	}
	if err := parseAllowDevices(c.AllowDevices); err != nil {
		return err
	}
	if c.allowBindPaths, err = parseAllowBindPaths(c.AllowBindPaths); err != nil {
		return err
	}
	if c.CNIPath == "" {
		c.CNIPath = defaultCNIPath
	}
	for _, dir := range filepath.SplitList(c.CNIPath) {
		if !filepath.IsAbs(dir) {
			return fmt.Errorf("cni_path = %q: must be absolute directories separated by ':', as the agent's cni_path (%q is not absolute)", c.CNIPath, dir)
		}
	}
	for _, t := range []struct {
		field, name string
		path        *string
	}{
		{"nspawn_path", "systemd-nspawn", &c.NspawnPath},
		{"systemd_run_path", "systemd-run", &c.SystemdRunPath},
		{"nsenter_path", "nsenter", &c.NsenterPath},
		{"nix_store_path", "nix-store", &c.NixStorePath},
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

// prepareDataDir makes data_dir, readable by root alone, or checks the one there: root runs what
// it holds (the console helper, machine roots), so no one else may be able to change it.
func prepareDataDir(dir string) error {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return fmt.Errorf("data_dir = %q: %w", dir, err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("data_dir = %q: %w", dir, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("data_dir = %q: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("data_dir = %q: not a directory (a %s); give the path of a directory, not of a link to one", dir, fi.Mode().Type())
	}
	if fi.Mode().Perm()&0o002 != 0 {
		return fmt.Errorf("data_dir = %q: writable by every user (mode %04o), who could replace what root runs from it; run `chmod o-w %s` (0700 is what the driver makes) or choose another directory", dir, fi.Mode().Perm(), dir)
	}
	return nil
}

// validateCacheAccess checks the credentials files and the transfer bound. Files are read again
// for each fetch, so a rotated token counts from the next task on. No message holds a secret.
func (c *PluginConfig) validateCacheAccess() (closure.CacheConfig, error) {
	if c.MaxSubstitutionJobs == 0 {
		c.MaxSubstitutionJobs = closure.DefaultJobs
	}
	if c.MaxSubstitutionJobs < 1 || c.MaxSubstitutionJobs > maxSubstitutionJobs {
		return closure.CacheConfig{}, fmt.Errorf("max_substitution_jobs = %d: must be between 1 and %d (narinfo lookups and NAR transfers of one fetch at once)", c.MaxSubstitutionJobs, maxSubstitutionJobs)
	}
	cc := closure.CacheConfig{NetrcFile: c.NetrcFile, AWSCredentialsFile: c.AWSCredentialsFile, Connections: c.MaxSubstitutionJobs}
	if c.NetrcFile != "" {
		if !filepath.IsAbs(c.NetrcFile) {
			return cc, fmt.Errorf("netrc_file = %q: must be an absolute path to a netrc file", c.NetrcFile)
		}
		if err := closure.CheckNetrc(c.NetrcFile); err != nil {
			return cc, fmt.Errorf("netrc_file = %q: %w; it takes Nix's netrc-file format: machine HOST login USER password TOKEN", c.NetrcFile, err)
		}
	}
	if c.AWSCredentialsFile != "" {
		if !filepath.IsAbs(c.AWSCredentialsFile) {
			return cc, fmt.Errorf("aws_credentials_file = %q: must be an absolute path to an AWS shared credentials file", c.AWSCredentialsFile)
		}
		f, err := os.Open(c.AWSCredentialsFile)
		if err != nil {
			return cc, fmt.Errorf("aws_credentials_file = %q: %w", c.AWSCredentialsFile, err)
		}
		f.Close()
	}
	known := map[string]bool{}
	for _, u := range append(append([]closure.CacheURL(nil), c.substituters...), c.trustedSubstituters...) {
		known[u.Identity()] = true
	}
	for i, bt := range c.BearerTokens {
		field := fmt.Sprintf("bearer_token[%d]", i)
		u, err := closure.ParseCacheURL(bt.Cache)
		if err != nil {
			return cc, fmt.Errorf("%s.cache = %w", field, err)
		}
		if !known[u.Identity()] {
			return cc, fmt.Errorf("%s.cache = %q: must name a cache of substituters or trusted_substituters", field, bt.Cache)
		}
		if !strings.HasPrefix(bt.Cache, "http") {
			return cc, fmt.Errorf("%s.cache = %q: only http:// and https:// caches take a bearer token; s3:// caches use aws_credentials_file", field, bt.Cache)
		}
		if _, dup := cc.BearerTokenFiles[u.Identity()]; dup {
			return cc, fmt.Errorf("%s.cache = %q: the cache has a bearer_token block already", field, bt.Cache)
		}
		if !filepath.IsAbs(bt.File) {
			return cc, fmt.Errorf("%s.file = %q: must be an absolute path to a file holding the token", field, bt.File)
		}
		if _, err := closure.ReadTokenFile(bt.File); err != nil {
			return cc, fmt.Errorf("%s.file = %q: %w", field, bt.File, err)
		}
		if cc.BearerTokenFiles == nil {
			cc.BearerTokenFiles = map[string]string{}
		}
		cc.BearerTokenFiles[u.Identity()] = bt.File
	}
	return cc, nil
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

// taskOptions is a validated task config.
type taskOptions struct {
	readyTimeout time.Duration
	privateUsers string
	rebootPolicy nspawn.RebootPolicy
	networkMode  string
	storeView    string
	substituters []closure.CacheURL
	privileges   nspawn.Privileges
	credentials  []nspawn.CredentialSource
}

// validate checks the task config; it runs after Nomad's interpolation, so it sees the values
// the machine would get.
func (c *TaskConfig) validate() (taskOptions, error) {
	toplevel, err := validateToplevel(c.Toplevel)
	if err != nil {
		return taskOptions{}, err
	}
	c.Toplevel = toplevel
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
	if c.BinaryCache != "" && c.Export != "" {
		return o, fmt.Errorf("binary_cache = %q and export = %q: give one way to deliver the closure, not both", c.BinaryCache, c.Export)
	}
	for _, f := range []struct{ name, value string }{{"binary_cache", c.BinaryCache}, {"export", c.Export}} {
		if f.value != "" && !taskDirPath(f.value) {
			return o, fmt.Errorf("%s = %q: must be a path relative to the task directory, such as \"local/closure\", without '..'", f.name, f.value)
		}
	}
	if o.substituters, err = closure.ParseCacheURLs("substituters", c.Substituters); err != nil {
		return o, err
	}
	for i, l := range c.Ports {
		if l == "" || strings.ContainsAny(l, " \x00\n") {
			return o, fmt.Errorf("ports[%d] = %q: must be the label of a port of the group's network block", i, l)
		}
	}
	switch c.StoreView {
	case "", storeViewClosure:
		o.storeView = storeViewClosure
	case storeViewHost:
		o.storeView = storeViewHost
	default:
		return o, fmt.Errorf("store_view = %q: must be %q (only the closure's paths in /nix/store) or %q (the host's whole Nix store)", c.StoreView, storeViewClosure, storeViewHost)
	}
	if o.credentials, err = c.credentialSources(); err != nil {
		return o, err
	}
	switch p := nspawn.RebootPolicy(c.RebootPolicy); p {
	case nspawn.RebootExit, nspawn.RebootRestart:
		o.rebootPolicy = p
	default:
		return o, fmt.Errorf("reboot_policy = %q: must be %q (a guest reboot ends the task with exit code 133) or %q (the machine boots again in place)", c.RebootPolicy, nspawn.RebootExit, nspawn.RebootRestart)
	}
	return o, nil
}

// validateToplevel checks that p is a store path and returns it without trailing slashes; whether
// it is a NixOS system for containers is checked once it is in the store. A link (a profile, a
// result link) is refused, not followed: it could point elsewhere by the time the machine
// restarts, and the task would no longer say what it runs.
func validateToplevel(p string) (string, error) {
	clean := p
	if trimmed := strings.TrimRight(p, "/"); trimmed != "" {
		clean = trimmed
	}
	if _, err := closure.ParsePath(clean); err != nil {
		if fi, lerr := os.Lstat(clean); lerr == nil && fi.Mode()&fs.ModeSymlink != 0 {
			target := ""
			if t, err := filepath.EvalSymlinks(clean); err == nil {
				target = ", here " + t
			}
			return "", fmt.Errorf("toplevel = %q: a symbolic link, and the driver does not follow links; give the store path it points to, as `readlink -f %s` prints it%s", p, clean, target)
		}
		return "", fmt.Errorf("toplevel = %q: must be a Nix store path: %w", p, err)
	}
	return clean, nil
}

// taskDirPath says whether p names something inside the task directory.
func taskDirPath(p string) bool {
	return p != "" && !filepath.IsAbs(p) && filepath.IsLocal(p) && !strings.ContainsRune(p, 0)
}

const (
	storeAuto        = "auto"
	storeViewClosure = "closure"
	storeViewHost    = "host"
)

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

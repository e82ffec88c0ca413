// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Package nspawn runs NixOS system closures as systemd-nspawn machines inside transient systemd
// service units. It knows nothing about Nomad.
package nspawn

import (
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"
)

// RebootPolicy says what a guest reboot (nspawn exit status 133) means.
type RebootPolicy string

const (
	// RebootExit ends the machine with exit status 133; the scheduler decides about a restart.
	RebootExit RebootPolicy = "exit"
	// RebootRestart lets systemd boot the machine again in place, keeping its root.
	RebootRestart RebootPolicy = "restart"
)

// SignalShutdown is SIGRTMIN+3 in glibc's numbering, which systemd and nspawn use: it asks a
// guest's systemd to power off.
const SignalShutdown = syscall.Signal(37)

// ExitReboot is the status systemd-nspawn exits with when the guest reboots.
const ExitReboot = 133

// Bind is a host directory made visible in the machine.
type Bind struct {
	Source   string
	Dest     string
	ReadOnly bool
	// IDMap shows the files with their host owners inside the machine (host UID 0 is the
	// guest's root, host UID 33 the guest's UID 33), through an idmapped mount, instead of as
	// nobody; the host filesystem must support it (CheckIDMap).
	IDMap bool
}

func (b Bind) arg() string {
	flag := "--bind="
	if b.ReadOnly {
		flag = "--bind-ro="
	}
	arg := flag + b.Source + ":" + b.Dest
	if b.IDMap {
		arg += ":idmap"
	}
	return arg
}

// Device is a host device node bound into the machine, with the unit's DeviceAllow= for it.
type Device struct {
	Source string
	Dest   string
	// Access is DeviceAllow='s "r", "w" and "m" letters.
	Access string
}

// Spec describes one machine: everything needed to build its unit and nspawn command line.
type Spec struct {
	Machine     string
	Description string
	// Root is the machine's root directory; PrepareRoot creates it.
	Root string
	// ExitFile receives the unit's result and exit status when nspawn ends (see UnitProperties).
	ExitFile string
	// ConsoleFile is what the unit appends the machine's console to.
	ConsoleFile string
	Toplevel    string
	InitArgs    []string
	// UUID becomes the guest's machine ID: derived from the task, so it is stable across restarts.
	UUID string

	NspawnPath string
	Slice      string

	// PrivateUsers is "pick" or "BASE:SIZE".
	PrivateUsers string
	Binds        []Bind
	Devices      []Device
	// Credentials become system credentials of the guest's systemd.
	Credentials []Credential
	// Env is given to the guest's PID 1.
	Env map[string]string
	// UnifiedCgroup makes nspawn give the guest a cgroup v2 hierarchy, which a NixOS root cannot
	// tell it by itself (it holds no systemd nspawn could inspect).
	UnifiedCgroup bool

	ReadyTimeout time.Duration
	StopTimeout  time.Duration
	RebootPolicy RebootPolicy

	Network    Network
	Resources  Resources
	Store      StoreView
	Privileges Privileges
}

// StoreView is what the machine sees in /nix/store.
type StoreView struct {
	// Dir is the host directory holding the store paths by base name.
	Dir string
	// Paths are the base names the machine sees, each bound on its own; nil binds all of Dir.
	Paths []string
	// Links are the Paths that are symlinks, with their targets: a bind mount would follow
	// them on the host, so they are written into View instead.
	Links map[string]string
	// View is the host directory, made by PrepareStoreView, that becomes the machine's
	// read-only /nix/store with Paths bound onto its mount points.
	View string
}

func (v StoreView) args() []string {
	if v.Paths == nil {
		return []string{"--bind-ro=" + v.Dir + ":" + guestStore}
	}
	// nspawn mounts parents before children, so the paths land on the view's mount points.
	args := make([]string, 0, len(v.Paths)+1)
	args = append(args, "--bind-ro="+v.View+":"+guestStore)
	for _, p := range v.Paths {
		if _, link := v.Links[p]; !link {
			args = append(args, "--bind-ro="+filepath.Join(v.Dir, p)+":"+guestStore+"/"+p)
		}
	}
	return args
}

// guestStore is the Nix store inside the machine.
const guestStore = "/nix/store"

// Network modes of a machine.
const (
	// NetworkVeth gives the machine its own namespace, linked to the host by a veth pair.
	NetworkVeth = "veth"
	// NetworkNone gives the machine its own namespace with loopback only.
	NetworkNone = "none"
	// NetworkHost shares the host's network namespace.
	NetworkHost = "host"
	// NetworkGroup runs the machine in an existing network namespace, its task group's (Nomad's
	// bridge mode): systemd starts nspawn inside it (NetworkNamespacePath=), so nspawn keeps it
	// while still making the user namespace. nspawn cannot join one from inside its user
	// namespace (--network-namespace-path with --private-users fails with EPERM up to v260).
	NetworkGroup = "group"
)

// OwnNamespace says whether the guest gets a network namespace of its own, and so the
// capabilities over it.
func OwnNamespace(mode string) bool { return mode != NetworkHost && mode != NetworkGroup }

// Network says how the machine is connected.
type Network struct {
	Mode string
	// Bridge, in veth mode, is an existing host bridge the host side of nspawn's veth joins.
	Bridge string
	// VethHost and VethGuest, in veth mode, name the pair nspawn makes for the driver's own
	// addressing; without them nspawn makes its own (ve-*, host0).
	VethHost, VethGuest string
	// NamespacePath, in group mode, is the network namespace the machine runs in.
	NamespacePath string
}

func (n Network) args() []string {
	switch {
	case n.Mode == NetworkHost, n.Mode == NetworkGroup:
		return nil
	case n.Mode == NetworkNone:
		return []string{"--private-network"}
	case n.Bridge != "":
		return []string{"--network-bridge=" + n.Bridge}
	case n.VethHost != "":
		return []string{"--network-veth-extra=" + n.VethHost + ":" + n.VethGuest}
	}
	return []string{"--network-veth"}
}

// Resources are the cgroup limits of the unit; zero means unset.
type Resources struct {
	MemoryLowBytes uint64
	MemoryMaxBytes uint64
	CPUWeight      uint64
	AllowedCPUs    string
	TasksMax       uint64
}

// Unit is the name of the transient service unit that runs the machine.
func (s *Spec) Unit() string { return UnitName(s.Machine) }

// Args is the systemd-nspawn command line, program name first.
func (s *Spec) Args() []string {
	args := []string{
		s.NspawnPath,
		"--quiet",
		// The transient unit is the machine's scope: machined registers it instead of making one.
		"--keep-unit",
		"--register=yes",
		// .nspawn files are an escape route (CVE-2026-40226) and nothing of ours needs them.
		"--settings=no",
		"--machine=" + s.Machine,
		"--directory=" + s.Root,
		"--private-users=" + s.PrivateUsers,
		// The root is fresh and nearly empty, so chowning it to the picked range is cheap.
		"--private-users-ownership=auto",
		// NixOS runs as a command, not --boot, so nspawn must be told how to shut it down.
		"--kill-signal=SIGRTMIN+3",
		"--notify-ready=yes",
		"--console=read-only",
		"--link-journal=no",
		"--timezone=off",
		"--resolv-conf=off",
	}
	args = append(args, s.Store.args()...)
	args = append(args, s.Network.args()...)
	args = append(args, s.Privileges.args()...)
	if s.UUID != "" {
		args = append(args, "--uuid="+s.UUID)
	}
	for _, b := range s.Binds {
		args = append(args, b.arg())
	}
	for _, d := range s.Devices {
		args = append(args, "--bind="+d.Source+":"+d.Dest)
	}
	for _, c := range s.Credentials {
		args = append(args, "--load-credential="+c.Name+":"+c.Path)
	}
	keys := make([]string, 0, len(s.Env))
	for k := range s.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "--setenv="+k+"="+s.Env[k])
	}
	args = append(args, "--", filepath.Join(s.Toplevel, "init"))
	return append(args, s.InitArgs...)
}

// What a host path of a machine cannot hold: in nspawn's --bind, ':' separates fields and '\'
// escapes; the exit file's path is a single-quoted shell word that systemd expands '$' in first.
const (
	unsafeInBind  = ":\\\n\x00"
	unsafeInShell = "'$\n\x00"
)

// Bindable says whether p can be a path of a --bind argument: absolute, without nspawn's
// separator ':', its escape '\' or control characters.
func Bindable(p string) bool {
	return filepath.IsAbs(p) && !strings.ContainsAny(p, unsafeInBind)
}

// CheckDataDir says whether dir can hold the directories of machines: their roots, store views
// and exit files, whose paths go into --bind arguments and the unit's shell command.
func CheckDataDir(dir string) error {
	if !filepath.IsAbs(dir) || strings.ContainsAny(dir, unsafeInBind+unsafeInShell) {
		return errors.New("must be an absolute path without quotes, '$', ':', '\\' or control characters")
	}
	return nil
}

// Validate checks what the command line cannot express safely.
func (s *Spec) Validate() error {
	if strings.ContainsAny(s.ExitFile, unsafeInShell) || !filepath.IsAbs(s.ExitFile) {
		return fmt.Errorf("exit file path %q must be absolute and contain no quote, '$' or control characters", s.ExitFile)
	}
	if !filepath.IsAbs(s.ConsoleFile) {
		return fmt.Errorf("console file path %q must be absolute", s.ConsoleFile)
	}
	if !Bindable(s.Store.Dir) {
		return fmt.Errorf("store directory %q must be absolute and contain no ':', '\\' or control characters", s.Store.Dir)
	}
	if s.Store.Paths != nil && !Bindable(s.Store.View) {
		return fmt.Errorf("store view directory %q must be absolute and contain no ':', '\\' or control characters", s.Store.View)
	}
	for _, p := range s.Store.Paths {
		if p == "" || p == "." || p == ".." || strings.ContainsAny(p, "/"+unsafeInBind) {
			return fmt.Errorf("store path name %q must be a plain name without ':', '\\' or control characters", p)
		}
	}
	for _, b := range s.Binds {
		for _, p := range []string{b.Source, b.Dest} {
			if !Bindable(p) {
				return fmt.Errorf("bind path %q must be absolute and contain no ':', '\\' or control characters", p)
			}
		}
	}
	for _, d := range s.Devices {
		for _, p := range []string{d.Source, d.Dest} {
			if !Bindable(p) {
				return fmt.Errorf("device path %q must be absolute and contain no ':', '\\' or control characters", p)
			}
		}
		if d.Access == "" || strings.Trim(d.Access, "rwm") != "" {
			return fmt.Errorf("device %q: access %q must be letters of r, w and m", d.Source, d.Access)
		}
	}
	for _, c := range s.Credentials {
		if !ValidCredentialName(c.Name) || !Bindable(c.Path) {
			return fmt.Errorf("credential %q from %q: the name must be a valid credential name, the path absolute without ':', '\\' or control characters", c.Name, c.Path)
		}
	}
	// The command line travels to systemd over D-Bus, whose strings are UTF-8 without NUL;
	// nspawn refuses --setenv names that are not shell variable names.
	for k, v := range s.Env {
		if !ValidEnvName(k) {
			return fmt.Errorf("environment variable %q: a name must be letters, digits and '_', not starting with a digit", k)
		}
		if strings.ContainsRune(v, 0) || !utf8.ValidString(v) {
			return fmt.Errorf("environment variable %q = %q: the value must be UTF-8 text without NUL bytes", k, v)
		}
	}
	for i, a := range s.InitArgs {
		if strings.ContainsRune(a, 0) || !utf8.ValidString(a) {
			return fmt.Errorf("init argument %d = %q: must be UTF-8 text without NUL bytes", i, a)
		}
	}
	if (s.Network.Mode == NetworkGroup) != (s.Network.NamespacePath != "") {
		return fmt.Errorf("network mode %q with namespace path %q: a namespace path goes with group mode only, and group mode needs one", s.Network.Mode, s.Network.NamespacePath)
	}
	if s.Network.NamespacePath != "" && !filepath.IsAbs(s.Network.NamespacePath) {
		return fmt.Errorf("network namespace path %q must be absolute", s.Network.NamespacePath)
	}
	return nil
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Package cgroupfs reads a unit's usage from the cgroup file system (v1, hybrid and v2) and
// follows its OOM kills. It knows nothing of Nomad or nspawn.
package cgroupfs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// CgroupMode is how the host mounts cgroups.
type CgroupMode string

const (
	CgroupUnified CgroupMode = "v2"
	CgroupHybrid  CgroupMode = "hybrid"
	CgroupLegacy  CgroupMode = "v1"
)

// Cgroups reads a unit's cgroup files below Base (normally /sys/fs/cgroup).
type Cgroups struct {
	Base string
	Mode CgroupMode
}

// DetectCgroups finds out how cgroups are mounted below base.
func DetectCgroups(base string) (Cgroups, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(base, &st); err != nil {
		return Cgroups{}, fmt.Errorf("no cgroup file system at %s: %w", base, err)
	}
	if st.Type == unix.CGROUP2_SUPER_MAGIC {
		return Cgroups{Base: base, Mode: CgroupUnified}, nil
	}
	if err := unix.Statfs(filepath.Join(base, "unified"), &st); err == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
		return Cgroups{Base: base, Mode: CgroupHybrid}, nil
	}
	return Cgroups{Base: base, Mode: CgroupLegacy}, nil
}

// Usage is one sample of a cgroup's memory and CPU accounting. Has* say which optional values
// the kernel provided.
type Usage struct {
	MemoryUsage    uint64
	MemoryRSS      uint64
	MemoryCache    uint64
	MemorySwap     uint64
	MemoryMaxUsage uint64
	HasSwap        bool
	HasMaxUsage    bool

	CPUTotal         time.Duration
	CPUUser          time.Duration
	CPUSystem        time.Duration
	ThrottledPeriods uint64
	ThrottledTime    time.Duration
}

// Read samples the cgroup at path (a unit's ControlGroup, e.g. /machine.slice/x.service).
func (c Cgroups) Read(path string) (Usage, error) {
	if c.Mode == CgroupUnified {
		return readV2(filepath.Join(c.Base, path))
	}
	return readV1(c.Base, path)
}

// OOMKills reads only the OOM kill counter: cheap enough to poll.
func (c Cgroups) OOMKills(path string) (uint64, error) {
	if c.Mode == CgroupUnified {
		kv, err := readKeyValues(filepath.Join(c.Base, path, "memory.events"))
		return kv["oom_kill"], err
	}
	kv, err := readKeyValues(filepath.Join(c.Base, "memory", path, "memory.oom_control"))
	return kv["oom_kill"], err
}

func readV2(dir string) (Usage, error) {
	var u Usage
	var err error
	if u.MemoryUsage, err = readUint(filepath.Join(dir, "memory.current")); err != nil {
		return u, err
	}
	mem, err := readKeyValues(filepath.Join(dir, "memory.stat"))
	if err != nil {
		return u, err
	}
	u.MemoryRSS, u.MemoryCache = mem["anon"], mem["file"]
	if v, err := readUint(filepath.Join(dir, "memory.swap.current")); err == nil {
		u.MemorySwap, u.HasSwap = v, true
	}
	// memory.peak exists from Linux 5.19 on.
	if v, err := readUint(filepath.Join(dir, "memory.peak")); err == nil {
		u.MemoryMaxUsage, u.HasMaxUsage = v, true
	}
	cpu, err := readKeyValues(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return u, err
	}
	u.CPUTotal = time.Duration(cpu["usage_usec"]) * time.Microsecond
	u.CPUUser = time.Duration(cpu["user_usec"]) * time.Microsecond
	u.CPUSystem = time.Duration(cpu["system_usec"]) * time.Microsecond
	u.ThrottledPeriods = cpu["nr_throttled"]
	u.ThrottledTime = time.Duration(cpu["throttled_usec"]) * time.Microsecond
	return u, nil
}

// userHZ is the unit of cpuacct.stat; Linux fixes it at 100 for user space.
const userHZ = 100

func readV1(base, path string) (Usage, error) {
	var u Usage
	var err error
	memDir := filepath.Join(base, "memory", path)
	if u.MemoryUsage, err = readUint(filepath.Join(memDir, "memory.usage_in_bytes")); err != nil {
		return u, err
	}
	if u.MemoryMaxUsage, err = readUint(filepath.Join(memDir, "memory.max_usage_in_bytes")); err == nil {
		u.HasMaxUsage = true
	}
	mem, err := readKeyValues(filepath.Join(memDir, "memory.stat"))
	if err != nil {
		return u, err
	}
	// total_* include the nested cgroups nspawn and the guest create.
	u.MemoryRSS, u.MemoryCache = mem["total_rss"], mem["total_cache"]
	if v, ok := mem["total_swap"]; ok {
		u.MemorySwap, u.HasSwap = v, true
	}

	acct := filepath.Join(base, "cpuacct", path)
	total, err := readUint(filepath.Join(acct, "cpuacct.usage"))
	switch {
	case err == nil:
		u.CPUTotal = time.Duration(total)
		st, err := readKeyValues(filepath.Join(acct, "cpuacct.stat"))
		if err != nil {
			return u, err
		}
		u.CPUUser = time.Duration(st["user"]) * time.Second / userHZ
		u.CPUSystem = time.Duration(st["system"]) * time.Second / userHZ
	case IsGone(err):
		// systemd makes no per-unit cpuacct cgroup when cpu and cpuacct are mounted apart; the
		// unit's live processes are the best measure left.
		if u.CPUUser, u.CPUSystem, err = processCPU(memDir); err != nil {
			return u, err
		}
		u.CPUTotal = u.CPUUser + u.CPUSystem
	default:
		return u, err
	}
	if cs, err := readKeyValues(filepath.Join(base, "cpu", path, "cpu.stat")); err == nil {
		u.ThrottledPeriods = cs["nr_throttled"]
		u.ThrottledTime = time.Duration(cs["throttled_time"])
	}
	return u, nil
}

// processCPU sums the user and system time of the processes in a cgroup tree.
func processCPU(dir string) (user, system time.Duration, err error) {
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil // the cgroup went away while walking
		}
		for _, pid := range strings.Fields(string(b)) {
			stat, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
			if err != nil {
				continue
			}
			// Fields after the command name, which may hold spaces, start after the last ')'.
			f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
			if len(f) < 13 {
				continue
			}
			ut, _ := strconv.ParseUint(f[11], 10, 64)
			st, _ := strconv.ParseUint(f[12], 10, 64)
			user += time.Duration(ut) * time.Second / userHZ
			system += time.Duration(st) * time.Second / userHZ
		}
		return nil
	})
	return user, system, err
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := string(bytes.TrimSpace(b))
	if s == "max" {
		return 0, nil
	}
	return strconv.ParseUint(s, 10, 64)
}

// readKeyValues parses files of "key value" lines such as memory.stat and cpu.stat.
func readKeyValues(path string) (map[string]uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]uint64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err != nil {
			continue
		}
		out[k] = n
	}
	return out, sc.Err()
}

// IsGone tells whether err means the cgroup no longer exists, e.g. because its unit ended.
func IsGone(err error) bool { return errors.Is(err, fs.ErrNotExist) }

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Package cgroupfs reads a unit's usage from the cgroup file system (v1, hybrid and v2) and
// follows its OOM kills. It knows nothing of Nomad or nspawn.
package cgroupfs

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
	"unsafe"

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

// Sampler reads one cgroup's usage again and again. It keeps the files it read open and reads
// them again from the start: opening a cgroup file costs the reader several times what reading
// it does, and Nomad asks for every task's usage every second. A file that fails is opened
// afresh (its cgroup was made again, its process ended); files the last sample did not read
// are closed.
type Sampler struct {
	c     Cgroups
	path  string
	files map[string]*os.File
	used  map[string]bool
	buf   []byte
	// missing are the optional files found missing, not looked for again before the next
	// refresh; refreshed counts the samples since.
	missing   map[string]bool
	refreshed int
	// procsFiles are the cgroup.procs files of the unit's tree, for the CPU time of its
	// processes, listed again at each refresh.
	procsFiles []string
}

// refreshEvery is how many samples reuse what was learnt of the unit's cgroups: the files that
// are not there and the list of its cgroups (listing them cost more than everything else a
// sample reads). A process in a cgroup made since counts from the next listing on, with all its
// CPU time.
const refreshEvery = 10

// Sampler samples the cgroup at path (a unit's ControlGroup, e.g. /machine.slice/x.service).
func (c Cgroups) Sampler(path string) *Sampler {
	return &Sampler{c: c, path: path, files: map[string]*os.File{}, used: map[string]bool{}, missing: map[string]bool{}, buf: make([]byte, 4096)}
}

// Read takes one sample.
func (s *Sampler) Read() (Usage, error) {
	if s.refreshed >= refreshEvery {
		clear(s.missing)
		s.procsFiles = nil
		s.refreshed = 0
	}
	s.refreshed++
	clear(s.used)
	var u Usage
	var err error
	if s.c.Mode == CgroupUnified {
		u, err = s.readV2(filepath.Join(s.c.Base, s.path))
	} else {
		u, err = s.readV1(s.c.Base, s.path)
	}
	for p, f := range s.files {
		if !s.used[p] {
			f.Close()
			delete(s.files, p)
		}
	}
	return u, err
}

// Close closes the files the sampler keeps open.
func (s *Sampler) Close() {
	for p, f := range s.files {
		f.Close()
		delete(s.files, p)
	}
}

// read returns the whole content of a file, valid until the next read.
func (s *Sampler) read(path string) ([]byte, error) {
	s.used[path] = true
	if f, ok := s.files[path]; ok {
		if b, err := s.readAll(f); err == nil {
			return b, nil
		}
		f.Close()
		delete(s.files, path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	b, err := s.readAll(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	s.files[path] = f
	return b, nil
}

// readOptional is read for a file the kernel or the host's setup may not provide; one found
// missing is looked for again at the next refresh.
func (s *Sampler) readOptional(path string) ([]byte, error) {
	if s.missing[path] {
		return nil, fs.ErrNotExist
	}
	b, err := s.read(path)
	if IsGone(err) {
		s.missing[path] = true
	}
	return b, err
}

// readAll reads f from its start. A read that does not fill the buffer got the whole file: the
// kernel's generated files (seq_file) fill a read up to its size.
func (s *Sampler) readAll(f *os.File) ([]byte, error) {
	for {
		n, err := readFromStart(f, s.buf)
		if err != nil {
			return nil, err
		}
		if n < len(s.buf) {
			return s.buf[:n], nil
		}
		s.buf = make([]byte, 2*len(s.buf))
	}
}

// readFromStart reads f from offset 0 in a raw system call. The kernel makes cgroup and /proc
// files in memory, so a read never blocks; through the runtime's system call path, Go hands the
// reader's processor to another thread whenever a read outlasts a tick of its monitor (20 µs),
// and a hundred machines' samples make five hundred such reads a second.
func readFromStart(f *os.File, b []byte) (int, error) {
	for {
		n, _, errno := unix.RawSyscall6(unix.SYS_PREAD64, f.Fd(), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0, 0, 0)
		runtime.KeepAlive(f)
		switch errno {
		case 0:
			return int(n), nil
		case unix.EINTR:
		default:
			return 0, &os.PathError{Op: "read", Path: f.Name(), Err: errno}
		}
	}
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

func (s *Sampler) readV2(dir string) (Usage, error) {
	var u Usage
	b, err := s.read(filepath.Join(dir, "memory.current"))
	if err != nil {
		return u, err
	}
	if u.MemoryUsage, err = parseUint(b); err != nil {
		return u, err
	}
	b, err = s.read(filepath.Join(dir, "memory.stat"))
	if err != nil {
		return u, err
	}
	eachKeyValue(b, func(k []byte, v uint64) {
		switch string(k) {
		case "anon":
			u.MemoryRSS = v
		case "file":
			u.MemoryCache = v
		}
	})
	if b, err := s.readOptional(filepath.Join(dir, "memory.swap.current")); err == nil {
		u.MemorySwap, err = parseUint(b)
		u.HasSwap = err == nil
	}
	// memory.peak exists from Linux 5.19 on.
	if b, err := s.readOptional(filepath.Join(dir, "memory.peak")); err == nil {
		u.MemoryMaxUsage, err = parseUint(b)
		u.HasMaxUsage = err == nil
	}
	b, err = s.read(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return u, err
	}
	cpuStat(&u, b)
	return u, nil
}

// cpuStat takes the CPU times and throttling from a cgroup v2 cpu.stat.
func cpuStat(u *Usage, b []byte) {
	eachKeyValue(b, func(k []byte, v uint64) {
		switch string(k) {
		case "usage_usec":
			u.CPUTotal = time.Duration(v) * time.Microsecond
		case "user_usec":
			u.CPUUser = time.Duration(v) * time.Microsecond
		case "system_usec":
			u.CPUSystem = time.Duration(v) * time.Microsecond
		case "nr_throttled":
			u.ThrottledPeriods = v
		case "throttled_usec":
			u.ThrottledTime = time.Duration(v) * time.Microsecond
		}
	})
}

// userHZ is the unit of cpuacct.stat; Linux fixes it at 100 for user space.
const userHZ = 100

func (s *Sampler) readV1(base, path string) (Usage, error) {
	var u Usage
	memDir := filepath.Join(base, "memory", path)
	b, err := s.read(filepath.Join(memDir, "memory.usage_in_bytes"))
	if err != nil {
		return u, err
	}
	if u.MemoryUsage, err = parseUint(b); err != nil {
		return u, err
	}
	if b, err := s.readOptional(filepath.Join(memDir, "memory.max_usage_in_bytes")); err == nil {
		u.MemoryMaxUsage, err = parseUint(b)
		u.HasMaxUsage = err == nil
	}
	b, err = s.read(filepath.Join(memDir, "memory.stat"))
	if err != nil {
		return u, err
	}
	// total_* include the nested cgroups nspawn and the guest create.
	eachKeyValue(b, func(k []byte, v uint64) {
		switch string(k) {
		case "total_rss":
			u.MemoryRSS = v
		case "total_cache":
			u.MemoryCache = v
		case "total_swap":
			u.MemorySwap, u.HasSwap = v, true
		}
	})
	if err := s.cpuV1(base, path, memDir, &u); err != nil {
		return u, err
	}
	if b, err := s.readOptional(filepath.Join(base, "cpu", path, "cpu.stat")); err == nil {
		eachKeyValue(b, func(k []byte, v uint64) {
			switch string(k) {
			case "nr_throttled":
				u.ThrottledPeriods = v
			case "throttled_time":
				u.ThrottledTime = time.Duration(v)
			}
		})
	}
	return u, nil
}

// cpuV1 reads the unit's CPU time where cgroup v1 holds the controllers.
func (s *Sampler) cpuV1(base, path, memDir string, u *Usage) error {
	acct := filepath.Join(base, "cpuacct", path)
	b, err := s.readOptional(filepath.Join(acct, "cpuacct.usage"))
	if err == nil {
		total, err := parseUint(b)
		if err != nil {
			return err
		}
		b, err = s.read(filepath.Join(acct, "cpuacct.stat"))
		if err != nil {
			return err
		}
		u.CPUTotal = time.Duration(total)
		eachKeyValue(b, func(k []byte, v uint64) {
			switch string(k) {
			case "user":
				u.CPUUser = time.Duration(v) * time.Second / userHZ
			case "system":
				u.CPUSystem = time.Duration(v) * time.Second / userHZ
			}
		})
		return nil
	}
	if !IsGone(err) {
		return err
	}
	// systemd makes no per-unit cpuacct cgroup when cpu and cpuacct are mounted apart.
	if s.c.Mode == CgroupHybrid {
		// The unified hierarchy, where systemd tracks units, has their CPU time all the same:
		// its cpu.stat needs no controller from Linux 4.20 on.
		b, err := s.readOptional(filepath.Join(base, "unified", path, "cpu.stat"))
		if err == nil {
			cpuStat(u, b)
			return nil
		}
		if !IsGone(err) {
			return err
		}
	}
	// The unit's live processes are the best measure left.
	if u.CPUUser, u.CPUSystem, err = s.processCPU(memDir); err != nil {
		return err
	}
	u.CPUTotal = u.CPUUser + u.CPUSystem
	return nil
}

// processCPU sums the user and system time of the processes in a cgroup tree.
func (s *Sampler) processCPU(dir string) (user, system time.Duration, err error) {
	if s.procsFiles == nil {
		if s.procsFiles, err = procsFiles(dir); err != nil {
			return 0, 0, err
		}
	}
	for _, p := range s.procsFiles {
		b, err := s.read(p)
		if err != nil {
			// The cgroup went away: list them again next time.
			s.procsFiles = nil
			continue
		}
		for _, pid := range strings.Fields(string(b)) {
			stat, err := s.read(filepath.Join("/proc", pid, "stat"))
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
	}
	return user, system, nil
}

// procsFiles lists the cgroup.procs files of the cgroup tree at dir.
func procsFiles(dir string) ([]string, error) {
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
			return err
		}
		out = append(out, p)
		return nil
	})
	return out, err
}

// parseUint parses a file holding one number; "max" (no limit) is 0.
func parseUint(b []byte) (uint64, error) {
	b = bytes.TrimSpace(b)
	if string(b) == "max" {
		return 0, nil
	}
	v, err := strconv.ParseUint(string(b), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("not a number: %q", b)
	}
	return v, nil
}

// eachKeyValue calls f for each "key value" line with a number as its value, as in memory.stat
// and cpu.stat; other lines are skipped.
func eachKeyValue(b []byte, f func(key []byte, v uint64)) {
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		k, v, ok := bytes.Cut(line, []byte{' '})
		if !ok {
			continue
		}
		// ParseUint does not keep its argument: the conversion allocates nothing.
		if n, err := strconv.ParseUint(string(bytes.TrimSpace(v)), 10, 64); err == nil {
			f(k, n)
		}
	}
}

// readKeyValues reads a file of "key value" lines once.
func readKeyValues(path string) (map[string]uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	eachKeyValue(b, func(k []byte, v uint64) { out[string(k)] = v })
	return out, nil
}

// IsGone tells whether err means the cgroup no longer exists, e.g. because its unit ended.
func IsGone(err error) bool { return errors.Is(err, fs.ErrNotExist) }

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package cgroupfs

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// The unit's ControlGroup as systemd reports it.
const (
	testCgroup       = "/machine.slice/nomad-3f2504e0-web.service"
	testCgroupOldV2  = "/machine.slice/nomad-old-kernel.service"
	testCgroupNoSwap = "/machine.slice/nomad-noswap.service"
	testCgroupGone   = "/machine.slice/nomad-gone.service"
)

func TestCgroupsV2_Read(t *testing.T) {
	c := Cgroups{Base: "testdata/cgroupv2", Mode: CgroupUnified}
	u, err := c.readOnce(testCgroup)
	must.NoError(t, err)
	must.Eq(t, Usage{
		MemoryUsage:    169308160,
		MemoryRSS:      45056000,  // anon, not anon_thp
		MemoryCache:    123654144, // file, not file_mapped
		MemorySwap:     4096,
		MemoryMaxUsage: 201326592,
		HasSwap:        true,
		HasMaxUsage:    true,

		CPUTotal:         8123456 * time.Microsecond,
		CPUUser:          5123456 * time.Microsecond,
		CPUSystem:        3 * time.Second,
		ThrottledPeriods: 42,
		ThrottledTime:    1234567 * time.Microsecond,
	}, u)
}

// Before Linux 5.19 there is no memory.peak, and without swap accounting no memory.swap.current.
func TestCgroupsV2_ReadOldKernel(t *testing.T) {
	c := Cgroups{Base: "testdata/cgroupv2", Mode: CgroupUnified}
	u, err := c.readOnce(testCgroupOldV2)
	must.NoError(t, err)
	must.Eq(t, Usage{
		MemoryUsage: 52428800,
		MemoryRSS:   20971520,
		MemoryCache: 31457280,
		CPUTotal:    1500 * time.Millisecond,
		CPUUser:     time.Second,
		CPUSystem:   500 * time.Millisecond,
	}, u)
	must.False(t, u.HasSwap)
	must.False(t, u.HasMaxUsage)
}

func TestCgroupsV2_OOMKills(t *testing.T) {
	c := Cgroups{Base: "testdata/cgroupv2", Mode: CgroupUnified}
	n, err := c.OOMKills(testCgroup)
	must.NoError(t, err)
	must.EqOp(t, uint64(2), n)

	_, err = c.OOMKills(testCgroupOldV2)
	must.True(t, IsGone(err), must.Sprintf("err = %v", err))
}

func TestCgroupsV1_Read(t *testing.T) {
	for _, mode := range []CgroupMode{CgroupHybrid, CgroupLegacy} {
		t.Run(string(mode), func(t *testing.T) {
			c := Cgroups{Base: "testdata/cgroupv1", Mode: mode}
			u, err := c.readOnce(testCgroup)
			must.NoError(t, err)
			must.Eq(t, Usage{
				MemoryUsage:    180355072,
				MemoryRSS:      45056000,  // total_rss includes the guest's nested cgroups
				MemoryCache:    123654144, // total_cache
				MemorySwap:     8192,
				MemoryMaxUsage: 268435456,
				HasSwap:        true,
				HasMaxUsage:    true,

				CPUTotal: 8123456789 * time.Nanosecond,
				// cpuacct.stat counts USER_HZ (100) ticks.
				CPUUser:          5120 * time.Millisecond,
				CPUSystem:        3 * time.Second,
				ThrottledPeriods: 7,
				ThrottledTime:    987654321 * time.Nanosecond,
			}, u)
		})
	}
}

func TestCgroupsV1_ReadNoSwap(t *testing.T) {
	c := Cgroups{Base: "testdata/cgroupv1", Mode: CgroupHybrid}
	u, err := c.readOnce(testCgroupNoSwap)
	must.NoError(t, err)
	must.Eq(t, Usage{
		MemoryUsage: 52428800,
		MemoryRSS:   20971520,
		MemoryCache: 31457280,
		CPUTotal:    1500 * time.Millisecond,
		CPUUser:     time.Second,
		CPUSystem:   500 * time.Millisecond,
	}, u)
}

func TestCgroupsV1_OOMKills(t *testing.T) {
	c := Cgroups{Base: "testdata/cgroupv1", Mode: CgroupHybrid}
	n, err := c.OOMKills(testCgroup)
	must.NoError(t, err)
	must.EqOp(t, uint64(5), n)

	_, err = c.OOMKills(testCgroupNoSwap)
	must.True(t, IsGone(err), must.Sprintf("err = %v", err))
}

func TestCgroups_Gone(t *testing.T) {
	for _, c := range []Cgroups{
		{Base: "testdata/cgroupv2", Mode: CgroupUnified},
		{Base: "testdata/cgroupv1", Mode: CgroupHybrid},
		{Base: "testdata/cgroupv1", Mode: CgroupLegacy},
	} {
		t.Run(string(c.Mode), func(t *testing.T) {
			_, err := c.readOnce(testCgroupGone)
			must.Error(t, err)
			must.True(t, IsGone(err), must.Sprintf("err = %v", err))
			_, err = c.OOMKills(testCgroupGone)
			must.True(t, IsGone(err), must.Sprintf("err = %v", err))
		})
	}
}

// A cgroup the kernel is removing can lose files between reads: that is gone too, not a failure.
func TestCgroupsV2_PartlyGone(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "machine.slice", "x.service")
	must.NoError(t, os.MkdirAll(dir, 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(dir, "memory.current"), []byte("4096\n"), 0o644))
	c := Cgroups{Base: base, Mode: CgroupUnified}

	_, err := c.readOnce("/machine.slice/x.service")
	must.True(t, IsGone(err), must.Sprintf("err = %v", err))

	must.NoError(t, os.WriteFile(filepath.Join(dir, "memory.stat"), []byte("anon 1\nfile 2\n"), 0o644))
	_, err = c.readOnce("/machine.slice/x.service")
	must.True(t, IsGone(err), must.Sprintf("err = %v", err))

	must.NoError(t, os.WriteFile(filepath.Join(dir, "cpu.stat"), []byte("usage_usec 1\nuser_usec 1\nsystem_usec 0\n"), 0o644))
	u, err := c.readOnce("/machine.slice/x.service")
	must.NoError(t, err)
	must.EqOp(t, uint64(4096), u.MemoryUsage)
	must.EqOp(t, time.Microsecond, u.CPUTotal)
}

func TestCgroups_Malformed(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "x.service")
	must.NoError(t, os.MkdirAll(dir, 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(dir, "memory.current"), []byte("lots\n"), 0o644))
	_, err := Cgroups{Base: base, Mode: CgroupUnified}.readOnce("/x.service")
	must.Error(t, err)
	must.False(t, IsGone(err))
}

func TestIsGone(t *testing.T) {
	must.False(t, IsGone(nil))
	_, err := os.ReadFile(filepath.Join(t.TempDir(), "nope"))
	must.True(t, IsGone(err))
	must.False(t, IsGone(os.ErrPermission))
}

func TestDetectCgroups_NotCgroupFS(t *testing.T) {
	dir := t.TempDir()
	c, err := DetectCgroups(dir)
	must.NoError(t, err)
	must.Eq(t, Cgroups{Base: dir, Mode: CgroupLegacy}, c)

	_, err = DetectCgroups(filepath.Join(dir, "missing"))
	must.Error(t, err)
}

// Without a per-unit cpuacct cgroup (cpu and cpuacct mounted apart) and a unified hierarchy, the
// CPU time is that of the unit's live processes, from the cgroup.procs files of its memory cgroup
// tree.
func TestCgroupsV1_ProcessCPUFallback(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	// Spend some CPU so both measures are well above the 10ms tick.
	deadline := time.Now().Add(60 * time.Millisecond)
	for x := 0; time.Now().Before(deadline); x++ {
		_ = x * x
	}

	base := t.TempDir()
	mem := filepath.Join(base, "memory", "machine.slice", "x.service")
	payload := filepath.Join(mem, "payload")
	must.NoError(t, os.MkdirAll(payload, 0o755))
	writeFiles(t, mem, map[string]string{
		"memory.usage_in_bytes": "1048576\n",
		"memory.stat":           "total_rss 4096\ntotal_cache 8192\n",
		"cgroup.procs":          "",
	})
	// This test process, and a PID that does not exist (a process that just exited).
	must.NoError(t, os.WriteFile(filepath.Join(payload, "cgroup.procs"), []byte(fmt.Sprintf("%d\n999999999\n", os.Getpid())), 0o644))

	var before, after syscall.Rusage
	must.NoError(t, syscall.Getrusage(syscall.RUSAGE_SELF, &before))
	u, err := Cgroups{Base: base, Mode: CgroupHybrid}.readOnce("/machine.slice/x.service")
	must.NoError(t, syscall.Getrusage(syscall.RUSAGE_SELF, &after))
	must.NoError(t, err)

	tick := 10 * time.Millisecond
	lo := time.Duration(before.Utime.Nano()) - 2*tick
	hi := time.Duration(after.Utime.Nano()) + 2*tick
	must.Between(t, lo, u.CPUUser, hi)
	lo = time.Duration(before.Stime.Nano()) - 2*tick
	hi = time.Duration(after.Stime.Nano()) + 2*tick
	must.Between(t, lo, u.CPUSystem, hi)
	must.EqOp(t, u.CPUUser+u.CPUSystem, u.CPUTotal)
	must.Positive(t, u.CPUTotal)
	must.EqOp(t, uint64(1048576), u.MemoryUsage)
	must.EqOp(t, uint64(4096), u.MemoryRSS)
}

// On a hybrid host without a per-unit cpuacct cgroup, the CPU time is the unit's in the unified
// hierarchy, exited processes included; only a host without it sums live processes.
func TestCgroupsHybrid_UnifiedCPU(t *testing.T) {
	base := t.TempDir()
	writeFiles(t, base, map[string]string{
		"memory/machine.slice/x.service/memory.usage_in_bytes": "1048576\n",
		"memory/machine.slice/x.service/memory.stat":           "total_rss 4096\ntotal_cache 8192\n",
		// No process: had the processes been summed, the CPU time would be 0.
		"memory/machine.slice/x.service/cgroup.procs": "",
		"unified/machine.slice/x.service/cpu.stat":    "usage_usec 1500001\nuser_usec 1000001\nsystem_usec 500000\nnice_usec 0\n",
	})
	u, err := Cgroups{Base: base, Mode: CgroupHybrid}.readOnce("/machine.slice/x.service")
	must.NoError(t, err)
	must.EqOp(t, 1500001*time.Microsecond, u.CPUTotal)
	must.EqOp(t, 1000001*time.Microsecond, u.CPUUser)
	must.EqOp(t, 500000*time.Microsecond, u.CPUSystem)
	must.EqOp(t, uint64(4096), u.MemoryRSS)

	u, err = Cgroups{Base: base, Mode: CgroupLegacy}.readOnce("/machine.slice/x.service")
	must.NoError(t, err)
	must.EqOp(t, time.Duration(0), u.CPUTotal)
}

// readOnce takes one sample with a sampler of its own.
func (c Cgroups) readOnce(path string) (Usage, error) {
	s := c.Sampler(path)
	defer s.Close()
	return s.Read()
}

// A sampler reads its open files again from the start: it sees what changed since, and keeps
// the files open only until Close.
func TestSampler_ReadsAgain(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "x.service")
	must.NoError(t, os.MkdirAll(dir, 0o755))
	write := func(name, content string) {
		must.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644))
	}
	write("memory.current", "4096\n")
	write("memory.stat", "anon 1\nfile 2\n")
	write("cpu.stat", "usage_usec 1\nuser_usec 1\nsystem_usec 0\n")
	fds := func() int {
		entries, err := os.ReadDir("/proc/self/fd")
		must.NoError(t, err)
		return len(entries)
	}
	before := fds()
	s := Cgroups{Base: base, Mode: CgroupUnified}.Sampler("/x.service")
	u, err := s.Read()
	must.NoError(t, err)
	must.EqOp(t, uint64(4096), u.MemoryUsage)
	must.EqOp(t, 3, fds()-before)

	// Longer than the sampler's first buffer, and written in place as the kernel's files change.
	write("memory.current", "8192\n")
	write("memory.stat", strings.Repeat("pgfault 7\n", 1000)+"anon 3\nfile 4\n")
	u, err = s.Read()
	must.NoError(t, err)
	must.EqOp(t, uint64(8192), u.MemoryUsage)
	must.EqOp(t, uint64(3), u.MemoryRSS)
	must.EqOp(t, uint64(4), u.MemoryCache)
	s.Close()
	must.EqOp(t, before, fds())
}

// Without cpuacct, a sampler lists the unit's cgroups at each refresh (every refreshEvery samples): a cgroup made in
// between counts from the next listing on.
func TestSampler_ListsCgroupsAgain(t *testing.T) {
	base := t.TempDir()
	mem := filepath.Join(base, "memory", "x.service")
	writeFiles(t, mem, map[string]string{
		"memory.usage_in_bytes": "1048576\n",
		"memory.stat":           "total_rss 4096\ntotal_cache 8192\n",
		"cgroup.procs":          "",
		"payload/cgroup.procs":  fmt.Sprintf("%d\n", os.Getpid()),
	})
	s := Cgroups{Base: base, Mode: CgroupHybrid}.Sampler("/x.service")
	defer s.Close()
	_, err := s.Read()
	must.NoError(t, err)
	must.Len(t, 2, s.procsFiles)

	must.NoError(t, os.MkdirAll(filepath.Join(mem, "late"), 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(mem, "late", "cgroup.procs"), nil, 0o644))
	for i := 1; i < refreshEvery; i++ {
		_, err := s.Read()
		must.NoError(t, err)
		must.Len(t, 2, s.procsFiles)
	}
	_, err = s.Read()
	must.NoError(t, err)
	must.Len(t, 3, s.procsFiles)
}

// An optional file found missing is looked for again at the next refresh only: each failed
// open costs a path walk of the cgroup file system.
func TestSampler_MissingFileLookedForAtRefresh(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "x.service")
	writeFiles(t, dir, map[string]string{
		"memory.current": "4096\n",
		"memory.stat":    "anon 1\nfile 2\n",
		"cpu.stat":       "usage_usec 1\nuser_usec 1\nsystem_usec 0\n",
	})
	s := Cgroups{Base: base, Mode: CgroupUnified}.Sampler("/x.service")
	defer s.Close()
	u, err := s.Read()
	must.NoError(t, err)
	must.False(t, u.HasMaxUsage)

	must.NoError(t, os.WriteFile(filepath.Join(dir, "memory.peak"), []byte("8192\n"), 0o644))
	for i := 1; i < refreshEvery; i++ {
		u, err = s.Read()
		must.NoError(t, err)
		must.False(t, u.HasMaxUsage, must.Sprintf("sample %d", i+1))
	}
	u, err = s.Read()
	must.NoError(t, err)
	must.True(t, u.HasMaxUsage)
	must.EqOp(t, uint64(8192), u.MemoryMaxUsage)
}

func TestEachKeyValue(t *testing.T) {
	got := map[string]uint64{}
	eachKeyValue([]byte("anon 12\nfile  34\nbad x\nnovalue\n\nbig 18446744073709551615\nhuge 99999999999999999999\nlast 5"), func(k []byte, v uint64) {
		got[string(k)] = v
	})
	must.Eq(t, map[string]uint64{"anon": 12, "file": 34, "big": math.MaxUint64, "last": 5}, got)
	for in, want := range map[string]uint64{"42\n": 42, "max\n": 0, " 7 ": 7} {
		v, err := parseUint([]byte(in))
		must.NoError(t, err)
		must.EqOp(t, want, v)
	}
	_, err := parseUint([]byte("-1\n"))
	must.ErrorContains(t, err, "not a number")

	// A sample of a hundred tasks a second parses without garbage.
	stat := []byte(strings.Repeat("total_rss 4096\ntotal_cache 8192\n", 20))
	var rss uint64
	must.EqOp(t, 0.0, testing.AllocsPerRun(100, func() {
		eachKeyValue(stat, func(k []byte, v uint64) {
			if string(k) == "total_rss" {
				rss = v
			}
		})
	}))
	must.EqOp(t, uint64(4096), rss)
}

// writeFiles writes each file, named relative to dir, with its content.
func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, name)
		must.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		must.NoError(t, os.WriteFile(p, []byte(content), 0o644))
	}
}

// A failed read names the file and keeps the kernel's error.
func TestReadFromStart_Error(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Open(dir)
	must.NoError(t, err)
	defer f.Close()
	_, err = readFromStart(f, make([]byte, 16))
	var pe *os.PathError
	must.ErrorAs(t, err, &pe)
	must.EqOp(t, dir, pe.Path)
	must.ErrorIs(t, err, syscall.EISDIR)
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/cgroupfs"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

const testAllocID = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"

// testStore is the host view of the host's Nix store.
var testStore = nspawn.StoreView{Dir: "/nix/store"}

func nomadResources(memMB, memMaxMB, shares int64) *drivers.Resources {
	return &drivers.Resources{NomadResources: &structs.AllocatedTaskResources{
		Memory: structs.AllocatedMemoryResources{MemoryMB: memMB, MemoryMaxMB: memMaxMB},
		Cpu:    structs.AllocatedCpuResources{CpuShares: shares},
	}}
}

func TestResources(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		name     string
		res      *drivers.Resources
		tasksMax int64
		want     nspawn.Resources
	}{
		{"nothing", nil, 0, nspawn.Resources{}},
		{"tasks max only", nil, 16384, nspawn.Resources{TasksMax: 16384}},
		{"negative tasks max means none", nil, -5, nspawn.Resources{}},
		{"no nomad resources", &drivers.Resources{}, 100, nspawn.Resources{TasksMax: 100}},
		{"memory is the hard limit", nomadResources(256, 0, 0), 0, nspawn.Resources{MemoryMaxBytes: 256 * mib}},
		{
			"memory_max makes memory a protection",
			nomadResources(256, 1024, 0), 0,
			nspawn.Resources{MemoryLowBytes: 256 * mib, MemoryMaxBytes: 1024 * mib},
		},
		{"memory_max -1 leaves no hard limit", nomadResources(256, -1, 0), 0, nspawn.Resources{MemoryLowBytes: 256 * mib}},
		{"cpu shares 100", nomadResources(0, 0, 100), 0, nspawn.Resources{CPUWeight: 4}},
		{"cpu shares 1024", nomadResources(0, 0, 1024), 0, nspawn.Resources{CPUWeight: 39}},
		{"cpu shares 0 is unset", nomadResources(0, 0, 0), 0, nspawn.Resources{}},
		{"all", nomadResources(512, 0, 2000), 64, nspawn.Resources{MemoryMaxBytes: 512 * mib, CPUWeight: 77, TasksMax: 64}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			must.Eq(t, c.want, resources(c.res, c.tasksMax))
		})
	}
}

// The kernel's conversion of cgroup v1 shares (2..262144) to v2 weights (1..10000):
// 1 + ((shares - 2) * 9999) / 262142.
func TestCPUWeight(t *testing.T) {
	cases := map[int64]uint64{
		-1:      0,
		0:       0,
		1:       1,
		2:       1,
		100:     4,   // 1 + 979902/262142
		1024:    39,  // 1 + 10218978/262142
		4096:    157, // 1 + 40935906/262142
		262144:  10000,
		1 << 30: 10000,
	}
	for shares, want := range cases {
		must.EqOp(t, want, cpuWeight(shares), must.Sprintf("shares %d", shares))
	}
	// Monotonic: more shares never mean less weight.
	prev := uint64(0)
	for s := int64(1); s <= 262144; s += 97 {
		w := cpuWeight(s)
		must.GreaterEq(t, prev, w)
		prev = w
	}
}

func TestResources_Cpuset(t *testing.T) {
	cases := []struct {
		name string
		lr   *drivers.LinuxResources
		want string
	}{
		{"reserved cores, cgroup v2", &drivers.LinuxResources{CpusetCpus: "2-3", CpusetCgroupPath: "/sys/fs/cgroup/nomad.slice/reserve.slice/" + testAllocID + ".web.scope"}, "2-3"},
		{"reserved cores, cgroup v1", &drivers.LinuxResources{CpusetCpus: "4", CpusetCgroupPath: "/sys/fs/cgroup/cpuset/nomad/reserve/" + testAllocID + "-web"}, "4"},
		{"shared cores, cgroup v2", &drivers.LinuxResources{CpusetCpus: "0-7", CpusetCgroupPath: "/sys/fs/cgroup/nomad.slice/share.slice/" + testAllocID + ".web.scope"}, ""},
		{"shared cores, cgroup v1", &drivers.LinuxResources{CpusetCpus: "0-7", CpusetCgroupPath: "/sys/fs/cgroup/cpuset/nomad/shared"}, ""},
		{"no cpuset", &drivers.LinuxResources{CpusetCgroupPath: "/sys/fs/cgroup/nomad.slice/reserve.slice/x.scope"}, ""},
		{"no linux resources", nil, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := nomadResources(128, 0, 100)
			r.LinuxResources = c.lr
			got := resources(r, 0)
			must.EqOp(t, c.want, got.AllowedCPUs)
			must.EqOp(t, uint64(128<<20), got.MemoryMaxBytes)
		})
	}
}

func TestGuestEnv(t *testing.T) {
	env := map[string]string{
		"NOMAD_TASK_NAME":       "web",
		"NOMAD_ALLOC_ID":        testAllocID,
		"PATH":                  "/bin",
		"containerX":            "kept",
		"SYSTEMD":               "kept, no underscore",
		"LISTEN":                "kept, no underscore",
		"EMPTY":                 "",
		"NOTIFY_SOCKET":         "/run/host/notify",
		"SYSTEMD_X":             "1",
		"SYSTEMD_LOG_LEVEL":     "debug",
		"LISTEN_FDS":            "3",
		"LISTEN_PID":            "1",
		"container":             "docker",
		"container_uuid":        "x",
		"container_host_id":     "nixos",
		"1BAD":                  "x",
		"BAD-NAME":              "x",
		"meta.with.dots":        "x",
		"":                      "x",
		"NOMAD_META_owner_team": "infra",
	}
	got := guestEnv(env)
	must.Eq(t, map[string]string{
		"NOMAD_TASK_NAME":       "web",
		"NOMAD_ALLOC_ID":        testAllocID,
		"PATH":                  "/bin",
		"containerX":            "kept",
		"SYSTEMD":               "kept, no underscore",
		"LISTEN":                "kept, no underscore",
		"EMPTY":                 "",
		"NOMAD_META_owner_team": "infra",
	}, got)
	// Nothing is left out without saying so.
	left := leftOutEnv(env)
	must.Eq(t, []string{
		`"" (systemd takes only names of letters, digits and '_', not starting with a digit)`,
		`"1BAD" (systemd takes only names of letters, digits and '_', not starting with a digit)`,
		`"BAD-NAME" (systemd takes only names of letters, digits and '_', not starting with a digit)`,
		`"LISTEN_FDS" (nspawn or the guest's systemd gives it a meaning of its own)`,
		`"LISTEN_PID" (nspawn or the guest's systemd gives it a meaning of its own)`,
		`"NOTIFY_SOCKET" (nspawn or the guest's systemd gives it a meaning of its own)`,
		`"SYSTEMD_LOG_LEVEL" (nspawn or the guest's systemd gives it a meaning of its own)`,
		`"SYSTEMD_X" (nspawn or the guest's systemd gives it a meaning of its own)`,
		`"container" (nspawn or the guest's systemd gives it a meaning of its own)`,
		`"container_host_id" (nspawn or the guest's systemd gives it a meaning of its own)`,
		`"container_uuid" (nspawn or the guest's systemd gives it a meaning of its own)`,
		`"meta.with.dots" (systemd takes only names of letters, digits and '_', not starting with a digit)`,
	}, left)
	must.EqOp(t, len(env), len(got)+len(left))
	must.MapEmpty(t, guestEnv(nil))
	must.SliceEmpty(t, leftOutEnv(nil))
}

// A value systemd cannot carry fails the task, naming the variable, instead of being dropped.
func TestMachineSpec_EnvValueRefused(t *testing.T) {
	d := &Driver{config: validPluginConfig(), logger: hclog.NewNullLogger()}
	cfg := &drivers.TaskConfig{ID: testAllocID + "/web/abcd1234", Name: "web", AllocID: testAllocID, AllocDir: "/var/lib/nomad/alloc/" + testAllocID, Resources: nomadResources(256, 0, 1024)}
	tc := &TaskConfig{Toplevel: absentToplevel}
	o := taskOptions{readyTimeout: time.Minute, privateUsers: "pick", rebootPolicy: nspawn.RebootExit}
	for _, v := range []string{"a\x00b", "a\xffb"} {
		cfg.Env = map[string]string{"BAD": v}
		_, err := testSpec(d, cfg, tc, o, testStore)
		must.ErrorContains(t, err, `environment variable "BAD"`)
	}
	cfg.Env = map[string]string{"SECRET": "pa$$word ${X} %n \\"}
	s, err := testSpec(d, cfg, tc, o, testStore)
	must.NoError(t, err)
	must.EqOp(t, "pa$$word ${X} %n \\", s.Env["SECRET"])
}

func TestTaskOfID(t *testing.T) {
	for _, task := range []string{"web", "Web Server", "a.b.c", "日本", "a/b"} {
		allocID, got, err := taskOfID(testAllocID + "/" + task + "/abcd1234")
		must.NoError(t, err)
		must.EqOp(t, testAllocID, allocID)
		must.EqOp(t, task, got)
	}
}

func TestTaskOfID_Invalid(t *testing.T) {
	for _, id := range []string{"", "x", testAllocID, testAllocID + "/web", testAllocID + "//abcd1234", "/"} {
		t.Run(id, func(t *testing.T) {
			_, _, err := taskOfID(id)
			must.Error(t, err)
			must.StrContains(t, err.Error(), `"`+id+`"`)
		})
	}
}

// The machine of a task ID, as DestroyTask finds it without a handle, is the one StartTask made.
func TestMachineOfTaskID(t *testing.T) {
	d := &Driver{config: validPluginConfig(), logger: hclog.NewNullLogger()}
	for _, task := range []string{"web", "Web Server", "日本"} {
		allocID, name, err := taskOfID(testAllocID + "/" + task + "/abcd1234")
		must.NoError(t, err)
		byID, err := d.machine(allocID, name)
		must.NoError(t, err)
		started, err := d.machine(testAllocID, task)
		must.NoError(t, err)
		must.EqOp(t, started.name, byID.name)
		must.EqOp(t, started.dir, byID.dir)
	}
	// A well-formed ID whose allocation part cannot name a machine.
	allocID, name, err := taskOfID("abc/web/abcd1234")
	must.NoError(t, err)
	_, err = d.machine(allocID, name)
	must.Error(t, err)
}

// A machine's files all live in its directory under data_dir, and the spec points at them.
func TestMachinePaths(t *testing.T) {
	d := &Driver{config: validPluginConfig(), logger: hclog.NewNullLogger()}
	m, err := d.machine(testAllocID, "web")
	must.NoError(t, err)
	dir := "/var/lib/nomad-driver-nixos/machines/" + m.name
	must.EqOp(t, dir, m.dir)
	for _, p := range []string{m.root(), m.storeView(), m.exitFile(), m.addressFile(), m.console().Log(), m.console().Offset()} {
		must.EqOp(t, dir, filepath.Dir(p))
	}
	must.EqOp(t, nspawn.UnitName(m.name), m.unit())
	must.EqOp(t, nspawn.ConsoleUnit(m.name), m.consoleUnit())
	// A recovered machine is where its state says, even if data_dir changed since.
	d.config.DataDir = "/srv/other"
	r := d.recoveredMachine(TaskState{Machine: m.name, MachineDir: dir}, testAllocID)
	must.EqOp(t, m.exitFile(), r.exitFile())
}

// testSpec is the spec of the machine of cfg.
func testSpec(d *Driver, cfg *drivers.TaskConfig, tc *TaskConfig, o taskOptions, store nspawn.StoreView) (*nspawn.Spec, error) {
	m, err := d.machine(cfg.AllocID, cfg.Name)
	if err != nil {
		return nil, err
	}
	return d.machineSpec(m, cfg, tc, o, store)
}

func TestMachineSpec(t *testing.T) {
	pc := validPluginConfig()
	d := &Driver{config: pc, logger: hclog.NewNullLogger(), cgroups: cgroupfs.Cgroups{Base: "/sys/fs/cgroup", Mode: cgroupfs.CgroupUnified}}
	cfg := &drivers.TaskConfig{
		ID:        testAllocID + "/web/abcd1234",
		Name:      "web",
		JobName:   "example",
		AllocID:   testAllocID,
		AllocDir:  "/var/lib/nomad/alloc/" + testAllocID,
		Env:       map[string]string{"NOMAD_TASK_NAME": "web", "NOTIFY_SOCKET": "/x"},
		Resources: nomadResources(256, 0, 1024),
	}
	tc := &TaskConfig{Toplevel: absentToplevel, InitArgs: []string{"quiet"}}
	o := taskOptions{readyTimeout: 90 * time.Second, privateUsers: "pick", rebootPolicy: nspawn.RebootRestart}

	s, err := testSpec(d, cfg, tc, o, testStore)
	must.NoError(t, err)
	machine, err := nspawn.MachineName(testAllocID, "web")
	must.NoError(t, err)
	must.EqOp(t, machine, s.Machine)
	dir := "/var/lib/nomad-driver-nixos/machines/" + machine
	must.EqOp(t, dir+"/root", s.Root)
	must.EqOp(t, dir+"/exit", s.ExitFile)
	must.StrContains(t, s.Description, testAllocID) // machine.remove relies on it
	must.EqOp(t, absentToplevel, s.Toplevel)
	must.Eq(t, []string{"quiet"}, s.InitArgs)
	must.EqOp(t, pc.NspawnPath, s.NspawnPath)
	must.EqOp(t, "machine.slice", s.Slice)
	must.EqOp(t, "pick", s.PrivateUsers)
	must.Eq(t, map[string]string{"NOMAD_TASK_NAME": "web"}, s.Env)
	must.True(t, s.UnifiedCgroup)
	must.EqOp(t, 90*time.Second, s.ReadyTimeout)
	must.EqOp(t, nspawn.RebootRestart, s.RebootPolicy)
	must.Eq(t, nspawn.Resources{MemoryMaxBytes: 256 << 20, CPUWeight: 39, TasksMax: 16384}, s.Resources)
	alloc := "/var/lib/nomad/alloc/" + testAllocID
	must.Eq(t, []nspawn.Bind{
		{Source: alloc + "/alloc", Dest: "/alloc"},
		{Source: alloc + "/alloc/logs", Dest: "/alloc/logs", ReadOnly: true},
		{Source: alloc + "/web/local", Dest: "/local"},
		{Source: alloc + "/web/secrets", Dest: "/secrets"},
	}, s.Binds)

	// The machine ID is a UUID in systemd's 32 hex digit form, stable per task and distinct
	// between tasks.
	must.RegexMatch(t, machineIDPattern, s.UUID)
	again, err := testSpec(d, cfg, tc, o, testStore)
	must.NoError(t, err)
	must.EqOp(t, s.UUID, again.UUID)
	other := *cfg
	other.Name = "db"
	db, err := testSpec(d, &other, tc, o, testStore)
	must.NoError(t, err)
	must.NotEq(t, s.UUID, db.UUID)
	must.NotEq(t, s.Machine, db.Machine)

	// On cgroup v1 the guest gets no unified hierarchy forced on it.
	d.cgroups.Mode = cgroupfs.CgroupHybrid
	hybrid, err := testSpec(d, cfg, tc, o, testStore)
	must.NoError(t, err)
	must.False(t, hybrid.UnifiedCgroup)
}

func TestMachineSpec_BadAllocDir(t *testing.T) {
	d := &Driver{config: validPluginConfig(), logger: hclog.NewNullLogger()}
	cfg := &drivers.TaskConfig{Name: "web", AllocID: testAllocID, AllocDir: "/var/lib/nomad/a:b"}
	_, err := testSpec(d, cfg, &TaskConfig{Toplevel: absentToplevel}, taskOptions{privateUsers: "pick"}, testStore)
	must.ErrorContains(t, err, "a:b")

	cfg = &drivers.TaskConfig{Name: "web", AllocID: "short", AllocDir: "/var/lib/nomad/alloc/x"}
	_, err = testSpec(d, cfg, &TaskConfig{Toplevel: absentToplevel}, taskOptions{privateUsers: "pick"}, testStore)
	must.Error(t, err)
}

var machineIDPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package driver

import (
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// Closure delivery through the driver: binary caches and export streams in the task directory
// (as artifacts leave them), HTTP binary caches, and the host's Nix store.

func closureFixture(t *testing.T, name string) string {
	return filepath.Join(fixture(t, "NIXOS_NSPAWN_CLOSURES"), name)
}

func fixtureKey(t *testing.T) string { return fixture(t, "NIXOS_NSPAWN_CACHE_PUBLIC_KEY") }

// cachedToplevel is a system only in the fixture caches, not in the host's Nix store.
func cachedToplevel(t *testing.T) string {
	b, err := os.ReadFile(closureFixture(t, "cached.toplevel"))
	must.NoError(t, err)
	return strings.TrimSpace(string(b))
}

func ownStore(key string) func(*PluginConfig) {
	return func(pc *PluginConfig) {
		pc.Store = "driver"
		if key != "" {
			pc.TrustedPublicKeys = []string{key}
		}
	}
}

func withConfig(f func(*TaskConfig)) taskOpt {
	return func(_ *drivers.TaskConfig, tc *TaskConfig) { f(tc) }
}

// intoTaskDir copies a fixture to rel in the task directory, as an artifact would put it.
func intoTaskDir(t *testing.T, cfg *drivers.TaskConfig, fixtureName, rel string) {
	dst := filepath.Join(cfg.TaskDir().Dir, rel)
	must.NoError(t, os.MkdirAll(filepath.Dir(dst), 0o755))
	run(t, "cp", "-a", closureFixture(t, fixtureName), dst)
}

// events collects the driver's task events.
func events(t *testing.T, td *testDriver) func() []string {
	ch, err := td.d.TaskEvents(t.Context())
	must.NoError(t, err)
	var mu sync.Mutex
	var got []string
	go func() {
		for ev := range ch {
			mu.Lock()
			got = append(got, ev.Message)
			mu.Unlock()
		}
	}()
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), got...)
	}
}

func waitEventText(t *testing.T, got func() []string, want string) {
	t.Helper()
	err := wait.InitialSuccess(wait.BoolFunc(func() bool {
		for _, m := range got() {
			if strings.Contains(m, want) {
				return true
			}
		}
		return false
	}), wait.Timeout(10*time.Second), wait.Gap(50*time.Millisecond)).Run()
	if err != nil {
		t.Fatalf("no event containing %q; events: %q", want, got())
	}
}

func requisitesOf(t *testing.T, p string) []string {
	out, err := exec.Command("nix-store", "-qR", p).Output()
	must.NoError(t, err)
	return strings.Fields(string(out))
}

// serveS3 serves a copy of a fixture cache as a bucket from rclone's `serve s3` (a real S3
// server that checks SigV4) on loopback, and returns the bucket's substituter URL and an AWS
// shared credentials file with the keys in its profile "nomad".
func serveS3(t *testing.T, fixtureName, bucket string) (string, string) {
	bin := fixture(t, "NIXOS_NSPAWN_RCLONE")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	dir := t.TempDir()
	must.NoError(t, os.Mkdir(filepath.Join(dir, "buckets"), 0o755))
	run(t, "cp", "-a", closureFixture(t, fixtureName), filepath.Join(dir, "buckets", bucket))
	must.NoError(t, os.WriteFile(filepath.Join(dir, "rclone.conf"), nil, 0o600))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	key, secret := "NXDRIVERKEY", "nx-driver-s3-secret"
	cmd := exec.Command(bin, "serve", "s3", "--config", filepath.Join(dir, "rclone.conf"), "--addr", addr,
		"--auth-key", key+","+secret, filepath.Join(dir, "buckets"))
	must.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	must.Wait(t, wait.InitialSuccess(wait.ErrorFunc(func() error {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	}), wait.Timeout(30*time.Second), wait.Gap(50*time.Millisecond)))
	creds := filepath.Join(dir, "credentials")
	must.NoError(t, os.WriteFile(creds, []byte("[nomad]\naws_access_key_id = "+key+"\naws_secret_access_key = "+secret+"\n"), 0o600))
	return "s3://" + bucket + "?endpoint=" + addr + "&scheme=http&profile=nomad", creds
}

func TestClosureDeliveryToOwnStore(t *testing.T) {
	tiny := tinyToplevel(t)
	closure := requisitesOf(t, tiny)
	srv := httptest.NewServer(http.FileServer(http.Dir(closureFixture(t, "tiny-zstd"))))
	t.Cleanup(srv.Close)
	unsignedSrv := httptest.NewServer(http.FileServer(http.Dir(closureFixture(t, "tiny-unsigned"))))
	t.Cleanup(unsignedSrv.Close)
	s3URL, s3Creds := serveS3(t, "tiny-xz", "systems")
	token := "attic-style-token-" + strconv.Itoa(os.Getpid())
	tokenFile := filepath.Join(t.TempDir(), "token")
	must.NoError(t, os.WriteFile(tokenFile, []byte(token+"\n"), 0o600))
	files := http.FileServer(http.Dir(closureFixture(t, "tiny-zstd")))
	tokenSrv := httptest.NewServer(http.StripPrefix("/ci", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+token {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		files.ServeHTTP(w, r)
	})))
	t.Cleanup(tokenSrv.Close)

	for _, tc := range []struct {
		name   string
		plugin func(*PluginConfig)
		setup  func(t *testing.T, cfg *drivers.TaskConfig)
		task   func(*TaskConfig)
		signed bool
		// unsigned is the event's note on unsigned paths, if not allow_unsigned's.
		unsigned string
	}{
		{
			name:   "binary cache directory (xz)",
			setup:  func(t *testing.T, cfg *drivers.TaskConfig) { intoTaskDir(t, cfg, "tiny-xz", "local/cache") },
			task:   func(tc *TaskConfig) { tc.BinaryCache = "local/cache" },
			signed: true,
		},
		{
			name:   "binary cache directory (uncompressed)",
			setup:  func(t *testing.T, cfg *drivers.TaskConfig) { intoTaskDir(t, cfg, "tiny-none", "local/cache") },
			task:   func(tc *TaskConfig) { tc.BinaryCache = "local/cache" },
			signed: true,
		},
		{
			name:   "export stream",
			plugin: func(pc *PluginConfig) { pc.AllowUnsigned = true },
			setup: func(t *testing.T, cfg *drivers.TaskConfig) {
				intoTaskDir(t, cfg, "tiny.export", "local/system.closure")
			},
			task: func(tc *TaskConfig) { tc.Export = "local/system.closure" },
		},
		{
			name:   "HTTP binary cache of the task",
			plugin: func(pc *PluginConfig) { pc.TrustedSubstituters = []string{srv.URL + "/"} },
			task:   func(tc *TaskConfig) { tc.Substituters = []string{srv.URL} },
			signed: true,
		},
		{
			name:   "HTTP binary cache of the plugin",
			plugin: func(pc *PluginConfig) { pc.Substituters = []string{srv.URL} },
			signed: true,
		},
		{
			name: "S3 binary cache of the plugin",
			plugin: func(pc *PluginConfig) {
				pc.Substituters = []string{s3URL}
				pc.AWSCredentialsFile = s3Creds
			},
			signed: true,
		},
		{
			name: "S3 binary cache of the task, after a cache that is down",
			plugin: func(pc *PluginConfig) {
				pc.TrustedSubstituters = []string{"http://127.0.0.1:9/down?priority=1", s3URL + "&priority=40"}
				pc.AWSCredentialsFile = s3Creds
			},
			task:   func(tc *TaskConfig) { tc.Substituters = []string{"http://127.0.0.1:9/down", s3URL} },
			signed: true,
		},
		{
			name: "token cache of the plugin",
			plugin: func(pc *PluginConfig) {
				pc.Substituters = []string{tokenSrv.URL + "/ci"}
				pc.BearerTokens = []BearerToken{{Cache: tokenSrv.URL + "/ci", File: tokenFile}}
			},
			signed: true,
		},
		{
			name:     "unsigned paths of a cache the plugin config trusts",
			plugin:   func(pc *PluginConfig) { pc.Substituters = []string{unsignedSrv.URL + "?trusted=1"} },
			unsigned: "unsigned paths accepted from " + unsignedSrv.URL + "?trusted=1, which the plugin config marks trusted",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mutate := []func(*PluginConfig){ownStore(fixtureKey(t))}
			if tc.plugin != nil {
				mutate = append(mutate, tc.plugin)
			}
			td := newTestDriver(t, "", mutate...)
			got := events(t, td)
			opts := []taskOpt{}
			if tc.task != nil {
				opts = append(opts, withConfig(tc.task))
			}
			cfg := td.newTask(t, "web", tiny, []string{"store", "files"}, opts...)
			if tc.setup != nil {
				tc.setup(t, cfg)
			}
			td.start(t, cfg)
			// The machine sees its closure and nothing else, read-only. The guest lists its store
			// sorted by name; nix-store -qR lists references first.
			names := make([]string, len(closure))
			for i, p := range closure {
				names[i] = filepath.Base(p)
			}
			slices.Sort(names)
			waitLog(t, cfg, "tinyinit: store-ro=yes", 30*time.Second)
			must.StrContains(t, logs(t, cfg), "tinyinit: store "+itoa(len(closure))+" "+strings.Join(names, " "))
			want := "closure fetched into the driver store: " + itoa(len(closure)) + " paths"
			waitEventText(t, got, want)
			switch {
			case tc.signed:
				waitEventText(t, got, "signature verified by nomad-driver-nixos-fixture-1")
			case tc.unsigned != "":
				waitEventText(t, got, tc.unsigned)
			default:
				waitEventText(t, got, "unsigned, accepted because the plugin config sets allow_unsigned")
			}
			if tc.task != nil && strings.Contains(tc.name, "down") {
				waitEventText(t, got, "binary cache http://127.0.0.1:9/down?priority=1 skipped: ")
			}
			for _, e := range got() {
				must.StrNotContains(t, e, token)
			}
			_, err := os.Stat(filepath.Join(td.dataDir, "store", ".roots", machineOf(t, cfg)))
			must.NoError(t, err, must.Sprint("the running machine's closure is rooted"))
		})
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func machineOf(t *testing.T, cfg *drivers.TaskConfig) string {
	return machineOfTaskID(t, cfg.ID)
}

func TestClosureRefusalsLeaveNothing(t *testing.T) {
	tiny := tinyToplevel(t)
	for _, tc := range []struct {
		name   string
		plugin func(*PluginConfig)
		top    string
		setup  func(t *testing.T, cfg *drivers.TaskConfig)
		task   func(*TaskConfig)
		want   string
	}{
		{
			name:   "no trusted key",
			plugin: func(pc *PluginConfig) { pc.TrustedPublicKeys = nil },
			setup:  func(t *testing.T, cfg *drivers.TaskConfig) { intoTaskDir(t, cfg, "tiny-xz", "local/cache") },
			task:   func(tc *TaskConfig) { tc.BinaryCache = "local/cache" },
			want:   "has no valid signature by a trusted key: signed by nomad-driver-nixos-fixture-1; trusted keys: none configured",
		},
		{
			name:  "unsigned cache",
			setup: func(t *testing.T, cfg *drivers.TaskConfig) { intoTaskDir(t, cfg, "tiny-unsigned", "local/cache") },
			task:  func(tc *TaskConfig) { tc.BinaryCache = "local/cache" },
			want:  "is not signed; trusted keys: nomad-driver-nixos-fixture-1",
		},
		{
			name: "unsigned export",
			setup: func(t *testing.T, cfg *drivers.TaskConfig) {
				intoTaskDir(t, cfg, "tiny.export", "local/system.closure")
			},
			task: func(tc *TaskConfig) { tc.Export = "local/system.closure" },
			want: "export streams carry no signatures",
		},
		{
			name: "tampered NAR",
			setup: func(t *testing.T, cfg *drivers.TaskConfig) {
				intoTaskDir(t, cfg, "tiny-none", "local/cache")
				nars, err := filepath.Glob(filepath.Join(cfg.TaskDir().Dir, "local/cache/nar/*.nar"))
				must.NoError(t, err)
				// The largest NAR is tinyinit's; its middle is file contents.
				var biggest string
				var size int64
				for _, n := range nars {
					if fi, err := os.Stat(n); err == nil && fi.Size() > size {
						biggest, size = n, fi.Size()
					}
				}
				b, err := os.ReadFile(biggest)
				must.NoError(t, err)
				b[len(b)/2] ^= 1
				must.NoError(t, os.WriteFile(biggest, b, 0o644))
			},
			task: func(tc *TaskConfig) { tc.BinaryCache = "local/cache" },
			want: "hash mismatch: NarHash is sha256:",
		},
		{
			name:  "toplevel with a kernel",
			top:   fixture(t, "NIXOS_NSPAWN_KERNEL_TOPLEVEL"),
			setup: func(t *testing.T, cfg *drivers.TaskConfig) { intoTaskDir(t, cfg, "vm-xz", "local/cache") },
			task:  func(tc *TaskConfig) { tc.BinaryCache = "local/cache" },
			want:  "has a kernel",
		},
		{
			name: "nowhere to fetch from",
			want: "is not in the driver's store, and the task names no binary_cache, export or substituters",
		},
		{
			name: "binary cache missing from the task directory",
			task: func(tc *TaskConfig) { tc.BinaryCache = "local/cache" },
			want: `binary_cache = "local/cache"`,
		},
		{
			name: "binary cache symlinked out of the task directory",
			setup: func(t *testing.T, cfg *drivers.TaskConfig) {
				must.NoError(t, os.Symlink(closureFixture(t, "tiny-xz"), filepath.Join(cfg.TaskDir().Dir, "local/cache")))
			},
			task: func(tc *TaskConfig) { tc.BinaryCache = "local/cache" },
			want: `binary_cache = "local/cache"`,
		},
		{
			name: "a substituter the operator did not name",
			task: func(tc *TaskConfig) { tc.Substituters = []string{"http://169.254.169.254/latest"} },
			want: `substituters[0] = "http://169.254.169.254/latest": a task may name only binary caches of the plugin config's substituters or trusted_substituters`,
		},
		{
			name: "host store view on the driver's store",
			task: func(tc *TaskConfig) { tc.StoreView = "host" },
			want: `store_view = "host": needs the host's Nix store`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mutate := []func(*PluginConfig){ownStore(fixtureKey(t))}
			if tc.plugin != nil {
				mutate = append(mutate, tc.plugin)
			}
			td := newTestDriver(t, "", mutate...)
			before := inventory(t, td.dataDir)
			top := tc.top
			if top == "" {
				top = tiny
			}
			var opts []taskOpt
			if tc.task != nil {
				opts = append(opts, withConfig(tc.task))
			}
			cfg := td.newTask(t, "web", top, nil, opts...)
			if tc.setup != nil {
				tc.setup(t, cfg)
			}
			_, _, err := td.StartTask(cfg)
			must.ErrorContains(t, err, tc.want)
			must.SliceEmpty(t, leftovers(t, td.dataDir, before))
			paths, err := os.ReadDir(filepath.Join(td.dataDir, "store"))
			must.NoError(t, err)
			for _, p := range paths {
				must.StrHasPrefix(t, ".", p.Name(), must.Sprint("a refused closure left a store path"))
			}
		})
	}
}

// Allocations share closures: concurrent starts fetch once, a later start fetches nothing, and
// a closure no allocation uses is collected after the grace period.
func TestClosureSharingAndCollection(t *testing.T) {
	tiny := tinyToplevel(t)
	cached := cachedToplevel(t)
	td := newTestDriver(t, "", ownStore(fixtureKey(t)), func(pc *PluginConfig) { pc.GCGrace = "1s" })
	got := events(t, td)
	withCache := withConfig(func(tc *TaskConfig) { tc.BinaryCache = "local/cache" })
	var cfgs []*drivers.TaskConfig
	for i := 0; i < 2; i++ {
		cfg := td.newTask(t, "web", tiny, []string{"store"}, withCache)
		intoTaskDir(t, cfg, "tiny-xz", "local/cache")
		cfgs = append(cfgs, cfg)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(cfgs))
	for i, cfg := range cfgs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, errs[i] = td.StartTask(cfg)
		}()
		t.Cleanup(func() { _ = td.d.DestroyTask(cfg.ID, true) })
	}
	wg.Wait()
	for _, err := range errs {
		must.NoError(t, err)
	}
	closure := requisitesOf(t, tiny)
	fetched := func() []string {
		var out []string
		for _, e := range got() {
			if strings.Contains(e, "closure fetched into the driver store") {
				out = append(out, e)
			}
		}
		return out
	}
	waitEventText(t, got, "closure fetched into the driver store: "+itoa(len(closure))+" paths")
	must.Len(t, 1, fetched(), must.Sprint(got()))

	third := td.newTask(t, "web", tiny, []string{"store"}, withCache)
	intoTaskDir(t, third, "tiny-xz", "local/cache")
	td.start(t, third)
	// The fetch, had there been one, was reported before the machine started.
	waitLog(t, third, "tinyinit: store ", 30*time.Second)
	must.Len(t, 1, fetched(), must.Sprint(got()))

	// A closure whose only allocation is gone is removed once the grace period passed.
	other := td.newTask(t, "batch", cached, []string{"exit=0"}, withCache)
	intoTaskDir(t, other, "cached-xz", "local/cache")
	_, _, err := td.StartTask(other)
	must.NoError(t, err)
	td.waitExit(t, other.ID, 30*time.Second)
	must.NoError(t, td.d.DestroyTask(other.ID, true))
	storeDir := filepath.Join(td.dataDir, "store")
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		_, err := os.Lstat(filepath.Join(storeDir, filepath.Base(cached)))
		return os.IsNotExist(err)
	}), wait.Timeout(15*time.Second), wait.Gap(200*time.Millisecond)))
	for _, p := range closure {
		_, err := os.Lstat(filepath.Join(storeDir, filepath.Base(p)))
		must.NoError(t, err, must.Sprintf("%s is in use and must stay", p))
	}
}

// The host's Nix store: imports become valid Nix paths with an indirect GC root per machine.
func TestClosureDeliveryToHostStore(t *testing.T) {
	cached := cachedToplevel(t)
	tiny := tinyToplevel(t)
	deleteCached := func() {
		_ = exec.Command("nix-store", "--delete", cached).Run()
		must.Error(t, exec.Command("nix-store", "--check-validity", cached).Run(), must.Sprint("the fixture is still in the store"))
	}
	deleteCached()
	t.Cleanup(deleteCached)
	td := newTestDriver(t, "", func(pc *PluginConfig) { pc.Store = "host"; pc.TrustedPublicKeys = []string{fixtureKey(t)} })
	before := inventory(t, td.dataDir)

	cfg := td.newTask(t, "web", cached, []string{"store"}, withConfig(func(tc *TaskConfig) { tc.BinaryCache = "local/cache" }))
	intoTaskDir(t, cfg, "cached-xz", "local/cache")
	td.start(t, cfg)
	waitLog(t, cfg, "tinyinit: store ", 30*time.Second)
	run(t, "nix-store", "--check-validity", cached)
	root := filepath.Join(td.dataDir, "gcroots", machineOf(t, cfg))
	target, err := os.Readlink(root)
	must.NoError(t, err)
	must.EqOp(t, cached, target)
	// Nix sees the closure's root in its gcroots, which the machine's link names.
	must.RegexMatch(t, regexp.MustCompile(`(?m)^/nix/var/nix/gcroots/nomad-driver-nixos/[0-9a-f]{12}-`+regexp.QuoteMeta(filepath.Base(cached))+` -> `),
		run(t, "nix-store", "-q", "--roots", cached))

	// A store path already in the host store, seen through the host view: the whole store.
	whole := td.newTask(t, "whole", tiny, []string{"store"}, withConfig(func(tc *TaskConfig) { tc.StoreView = "host" }))
	td.start(t, whole)
	waitLog(t, whole, "tinyinit: store ", 30*time.Second)
	entries, err := os.ReadDir("/nix/store")
	must.NoError(t, err)
	must.StrContains(t, logs(t, whole), "tinyinit: store "+itoa(len(entries)))

	for _, c := range []*drivers.TaskConfig{cfg, whole} {
		must.NoError(t, td.d.DestroyTask(c.ID, true))
	}
	_, err = os.Lstat(root)
	must.True(t, os.IsNotExist(err))
	must.SliceEmpty(t, leftovers(t, td.dataDir, before))
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-nixos/nomad-driver-nixos/closure"
	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

const (
	// progressInterval spaces the task events that report a fetch's progress: Nomad keeps a
	// task's last 10 events, and the others (a skipped cache) must stay readable.
	progressInterval = 10 * time.Second
	// maxGCInterval bounds how long an unused closure outlives its grace period.
	maxGCInterval = 5 * time.Minute
)

// newImporter opens the store the plugin config asks for.
func newImporter(pc PluginConfig) (*closure.Importer, error) {
	kind := pc.Store
	if kind != closure.KindDriver {
		usable := closure.HostNixUsable(pc.NixStorePath)
		switch {
		case kind == closure.KindHost && !usable:
			return nil, fmt.Errorf(`store = "host": the host's Nix store cannot take imports (%s does not run, or %s or /nix/var/nix/db is not writable); use "auto" or "driver"`, pc.NixStorePath, closure.StoreDir)
		case usable:
			kind = closure.KindHost
		default:
			kind = closure.KindDriver
		}
	}
	var store closure.Store
	var err error
	switch kind {
	case closure.KindHost:
		store, err = closure.NewNixStore(pc.NixStorePath, filepath.Join(pc.DataDir, "gcroots"), filepath.Join(pc.DataDir, "tmp"))
	default:
		store, err = closure.NewOwnStore(filepath.Join(pc.DataDir, "store"))
	}
	if err != nil {
		return nil, fmt.Errorf("opening the %s store: %w", kind, err)
	}
	return closure.NewImporter(store, closure.Policy{Keys: pc.keys, AllowUnsigned: pc.AllowUnsigned}), nil
}

// collectGarbage removes unused closures from the driver's own store until ctx ends.
func (d *Driver) collectGarbage(ctx context.Context, im *closure.Importer, grace time.Duration) {
	interval := min(max(grace/2, time.Second), maxGCInterval)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		removed, err := im.Collect(ctx, grace)
		if err != nil {
			d.logger.Error("collecting unused store paths", "error", err)
		} else if len(removed) > 0 {
			d.logger.Info("removed unused store paths", "count", len(removed))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// importer is the closure importer of the current plugin config.
func (d *Driver) importer() *closure.Importer {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.imp
}

// fetchClosure brings the task's closure into the store, rooted under the machine's name, and
// returns what the machine sees in /nix/store.
func (d *Driver) fetchClosure(ctx context.Context, m *machine, cfg *drivers.TaskConfig, tc *TaskConfig, o taskOptions) (nspawn.StoreView, error) {
	im := m.imp
	if im == nil {
		return nspawn.StoreView{}, errors.New("the plugin is not configured")
	}
	pc := d.pluginConfig()
	store := im.Store()
	if o.storeView == storeViewHost && store.Kind() != closure.KindHost {
		return nspawn.StoreView{}, fmt.Errorf(`store_view = "host": needs the host's Nix store, but this client keeps closures in the driver's own store (plugin config store = %q)`, pc.Store)
	}
	req := closure.Request{Toplevel: tc.Toplevel, Root: m.name}
	var taskDir *os.Root
	if tc.BinaryCache != "" || tc.Export != "" {
		if cfg.TaskDir() == nil || cfg.TaskDir().Dir == "" {
			return nspawn.StoreView{}, errors.New("the task has no task directory to read binary_cache or export from")
		}
		var err error
		// Reading through an os.Root keeps symlinks in an artifact from reaching outside the task directory.
		if taskDir, err = os.OpenRoot(cfg.TaskDir().Dir); err != nil {
			return nspawn.StoreView{}, err
		}
		defer taskDir.Close()
	}
	if tc.BinaryCache != "" {
		root, err := taskDir.OpenRoot(tc.BinaryCache)
		if err != nil {
			return nspawn.StoreView{}, fmt.Errorf("binary_cache = %q: %w", tc.BinaryCache, err)
		}
		cache, err := closure.NewDirCache(root, "binary_cache "+tc.BinaryCache)
		if err != nil {
			return nspawn.StoreView{}, fmt.Errorf("binary_cache = %q: %w", tc.BinaryCache, err)
		}
		defer cache.Close()
		req.Caches = append(req.Caches, cache)
	}
	if tc.Export != "" {
		f, err := taskDir.Open(tc.Export)
		if err != nil {
			return nspawn.StoreView{}, fmt.Errorf("export = %q: %w", tc.Export, err)
		}
		defer f.Close()
		if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
			return nspawn.StoreView{}, fmt.Errorf("export = %q: must be a file written by nix-store --export", tc.Export)
		}
		req.Export = f
	}
	urls, err := taskCaches(o.substituters, pc)
	if err != nil {
		return nspawn.StoreView{}, err
	}
	for _, u := range urls {
		cache, err := closure.OpenCache(u, pc.cacheConfig)
		if err != nil {
			return nspawn.StoreView{}, err
		}
		defer cache.Close()
		req.Caches = append(req.Caches, cache)
	}
	emit := d.emitter(cfg)
	req.Event = func(msg string) { emit(msg, nil) }
	req.Jobs = pc.MaxSubstitutionJobs
	var mu sync.Mutex
	var last time.Time
	req.Progress = func(p closure.Progress) {
		mu.Lock()
		defer mu.Unlock()
		if p.Paths < p.TotalPaths && time.Since(last) < progressInterval {
			return
		}
		last = time.Now()
		emit(fmt.Sprintf("fetching closure: %d/%d paths, %s/%s", p.Paths, p.TotalPaths, byteSize(p.Bytes), byteSize(p.TotalBytes)), nil)
	}
	start := time.Now()
	res, err := im.Import(ctx, req)
	if err != nil {
		return nspawn.StoreView{}, fmt.Errorf("toplevel = %q: %w", tc.Toplevel, err)
	}
	switch {
	case res.Fetched > 0:
		msg := fmt.Sprintf("closure fetched into the %s store: %d paths, %s in %s", store.Kind(), res.Fetched, byteSize(res.Bytes), time.Since(start).Round(time.Millisecond))
		if res.Resumed > 0 {
			msg += fmt.Sprintf(" (%d dropped transfers resumed)", res.Resumed)
		}
		if len(res.SignedBy) > 0 {
			msg += "; signature verified by " + strings.Join(res.SignedBy, ", ")
		}
		switch {
		case len(res.UnsignedFrom) > 0:
			msg += "; unsigned paths accepted from " + strings.Join(res.UnsignedFrom, ", ") + ", which the plugin config marks trusted"
		case len(res.SignedBy) == 0:
			msg += "; unsigned, accepted because the plugin config sets allow_unsigned"
		}
		emit(msg, nil)
	case res.Realised:
		emit("closure realised by the host's Nix", nil)
	}
	if o.storeView == storeViewHost {
		return nspawn.StoreView{Dir: store.Dir()}, nil
	}
	return closureView(store.Dir(), m.storeView(), res.Requisites)
}

// taskCaches is the task's substituters, then the plugin config's, each cache once. A task may
// name only binary caches the operator listed, as Nix lets untrusted users name only
// trusted-substituters: the driver fetches as root, and would otherwise ask any address a job
// author wrote. A task's entry is the operator's, with the operator's priority and trust.
func taskCaches(urls []closure.CacheURL, pc PluginConfig) ([]closure.CacheURL, error) {
	allowed := map[string]closure.CacheURL{}
	for _, u := range append(append([]closure.CacheURL(nil), pc.substituters...), pc.trustedSubstituters...) {
		if _, ok := allowed[u.Identity()]; !ok {
			allowed[u.Identity()] = u
		}
	}
	var out []closure.CacheURL
	seen := map[string]bool{}
	for i, u := range urls {
		op, ok := allowed[u.Identity()]
		if !ok {
			return nil, fmt.Errorf("substituters[%d] = %q: a task may name only binary caches of the plugin config's substituters or trusted_substituters", i, u.Raw())
		}
		if u.String() != u.Identity() && u.String() != op.String() {
			return nil, fmt.Errorf("substituters[%d] = %q: priority, want-mass-query and trusted are the plugin config's to set; name the cache as %q", i, u.Raw(), u.Identity())
		}
		if !seen[op.Identity()] {
			seen[op.Identity()] = true
			out = append(out, op)
		}
	}
	for _, u := range pc.substituters {
		if !seen[u.Identity()] {
			seen[u.Identity()] = true
			out = append(out, u)
		}
	}
	return out, nil
}

// closureView binds each path of the closure on its own, and writes symlink paths as symlinks.
func closureView(dir, view string, requisites []string) (nspawn.StoreView, error) {
	v := nspawn.StoreView{Dir: dir, View: view, Paths: make([]string, 0, len(requisites))}
	for _, p := range requisites {
		base, err := closure.ParsePath(p)
		if err != nil {
			return v, err
		}
		v.Paths = append(v.Paths, base)
		fi, err := os.Lstat(filepath.Join(dir, base))
		if err != nil {
			return v, err
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			target, err := os.Readlink(filepath.Join(dir, base))
			if err != nil {
				return v, err
			}
			if v.Links == nil {
				v.Links = map[string]string{}
			}
			v.Links[base] = target
		}
	}
	return v, nil
}

// byteSize writes a size in KiB below a MiB, else in MiB.
func byteSize(b uint64) string {
	if b < 1<<20 {
		return fmt.Sprintf("%.1f KiB", float64(b)/(1<<10))
	}
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}

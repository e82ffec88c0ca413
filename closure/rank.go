// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"sync"
)

// rankedCache is a cache of one import with what decides when it is asked.
type rankedCache struct {
	src      Source
	priority int
	trusted  bool

	mu sync.Mutex
	// down is why the cache is no longer asked in this import.
	down error
}

func (c *rankedCache) isDown() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.down
}

// markDown stops asking c in this import, and says so once.
func (c *rankedCache) markDown(err error, event func(string)) {
	c.mu.Lock()
	first := c.down == nil
	if first {
		c.down = err
	}
	c.mu.Unlock()
	if first && event != nil {
		event(fmt.Sprintf("binary cache %s skipped: %v", c.src, err))
	}
}

// rankCaches reads every URL cache's nix-cache-info at once and orders the caches as Nix orders
// substituters: by priority, lowest first, the URL's priority= before nix-cache-info's Priority,
// 0 without either; equals keep the order given. Caches not opened from a URL (a task's
// directory) come first. A cache that cannot be reached is marked down
// (and the event says so) rather than failing the import: another may have the paths. A cache
// for another store directory fails it.
func rankCaches(ctx context.Context, caches []Source, jobs int, event func(string)) ([]*rankedCache, error) {
	ranked := make([]*rankedCache, len(caches))
	errs := make([]error, len(caches))
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(jobs, 1))
	for i, src := range caches {
		rc := &rankedCache{src: src}
		ranked[i] = rc
		p, fromURL := src.(parameterized)
		if !fromURL {
			// A task's binary_cache artifact is on disk already: it is asked first.
			rc.priority = math.MinInt
			continue
		}
		params := p.params()
		rc.trusted = params.Trusted
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			info, err := readCacheInfo(ctx, src)
			var ie integrityError
			switch {
			case errors.As(err, &ie) || ctx.Err() != nil:
				errs[i] = err
			case err != nil:
				rc.markDown(err, event)
			}
			switch {
			case params.HasPriority:
				rc.priority = params.Priority
			case info.HasPriority:
				rc.priority = info.Priority
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	sort.SliceStable(ranked, func(i, j int) bool { return ranked[i].priority < ranked[j].priority })
	return ranked, nil
}

// readCacheInfo reads a cache's nix-cache-info; a cache without one has the defaults.
func readCacheInfo(ctx context.Context, src Source) (CacheInfo, error) {
	rc, err := src.Open(ctx, "nix-cache-info")
	if errors.Is(err, ErrNotFound) {
		return CacheInfo{}, nil
	}
	if err != nil {
		return CacheInfo{}, err
	}
	defer rc.Close()
	info, err := parseCacheInfo(rc)
	var ie integrityError
	switch {
	case errors.As(err, &ie):
		return CacheInfo{}, integrityf("%s: %w", src, err)
	case err != nil:
		return CacheInfo{}, fmt.Errorf("reading nix-cache-info: %w", err)
	}
	return info, nil
}

// downCaches describes the caches that could not be used, for an error.
func downCaches(caches []*rankedCache) string {
	var parts []string
	for _, c := range caches {
		if err := c.isDown(); err != nil {
			parts = append(parts, fmt.Sprintf("%s could not be used: %v", c.src, err))
		}
	}
	return strings.Join(parts, "; ")
}

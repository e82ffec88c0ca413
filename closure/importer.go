// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/narinfo"
	"golang.org/x/sync/errgroup"
)

const (
	// fetchAttempts is how often a NAR from a network cache is tried before the import fails.
	fetchAttempts = 3
	// resumeAttempts is how often one transfer of a NAR continues after its connection dropped.
	resumeAttempts = 3
	// DefaultJobs is how many narinfo lookups and NAR transfers run at once without a Jobs
	// setting: Nix's max-substitution-jobs.
	DefaultJobs = 16
	// progressStep is how many bytes pass between progress reports within a path.
	progressStep = 4 << 20
)

// Policy is what the operator trusts.
type Policy struct {
	Keys TrustedKeys
	// AllowUnsigned accepts paths no trusted key signed, and export streams.
	AllowUnsigned bool
}

// Importer brings closures into a store. It lets one import at a time fetch a given path, so
// allocations that start the same closure together download it once.
type Importer struct {
	store  Store
	policy Policy

	// gc is held shared by imports and root changes, exclusively by garbage collection.
	gc sync.RWMutex

	mu   sync.Mutex
	busy map[string]chan struct{}
	// closures are the requisites of toplevels imported before, newest last: a store path's
	// closure never changes, so a toplevel still in the store needs Nix again only for its root.
	closures []knownClosure
}

type knownClosure struct {
	toplevel   string
	requisites []string
}

// maxKnownClosures bounds the memory of closures seen (a 1,000-path closure is about 80 KB).
const maxKnownClosures = 64

// NewImporter imports into store under policy.
func NewImporter(store Store, policy Policy) *Importer {
	return &Importer{store: store, policy: policy, busy: map[string]chan struct{}{}}
}

func (im *Importer) knownRequisites(toplevel string) []string {
	im.mu.Lock()
	defer im.mu.Unlock()
	for _, c := range im.closures {
		if c.toplevel == toplevel {
			return c.requisites
		}
	}
	return nil
}

func (im *Importer) remember(toplevel string, requisites []string) {
	im.mu.Lock()
	defer im.mu.Unlock()
	im.closures = slices.DeleteFunc(im.closures, func(c knownClosure) bool { return c.toplevel == toplevel })
	if len(im.closures) == maxKnownClosures {
		im.closures = im.closures[1:]
	}
	im.closures = append(im.closures, knownClosure{toplevel, requisites})
}

// reuse roots a toplevel imported before without asking the store what is missing or what its
// closure is. A valid path's closure is valid, and a toplevel on disk is valid but in the moment
// a garbage collector deletes it: the host store checks it again under Nix's garbage collector
// lock as it adds the root, and the driver's own collector waits for imports. Any error sends
// the caller down the full import.
func (im *Importer) reuse(ctx context.Context, req Request, requisites []string) (*Result, error) {
	if err := CheckToplevel(im.store.Dir(), req.Toplevel); err != nil {
		return nil, err
	}
	if req.Root != "" {
		if err := im.store.AddRoot(ctx, req.Root, req.Toplevel); err != nil {
			return nil, err
		}
	}
	return &Result{Requisites: requisites}, nil
}

// Store is where the importer puts paths.
func (im *Importer) Store() Store { return im.store }

// Request says which closure to import and from where.
type Request struct {
	Toplevel string
	// Caches are tried in order for each missing path.
	Caches []Source
	// Export, if set, is a `nix-store --export` stream holding the missing paths.
	Export *os.File
	// Root names the GC root that keeps the closure while it is in use.
	Root string
	// Progress, if set, is told how the fetch goes, one call at a time.
	Progress func(Progress)
	// Event, if set, is told what the operator should know of, such as a cache that is down and
	// skipped; from several goroutines.
	Event func(string)
	// Jobs bounds the narinfo lookups and NAR transfers that run at once; 0 is DefaultJobs.
	Jobs int
}

// Progress of an import.
type Progress struct {
	Paths, TotalPaths int
	Bytes, TotalBytes uint64
}

// Result of an import.
type Result struct {
	// Requisites is the toplevel's closure, the toplevel included.
	Requisites []string
	// Fetched and Bytes count what this import transferred.
	Fetched int
	Bytes   uint64
	// SignedBy names the keys that signed the fetched paths.
	SignedBy []string
	// UnsignedFrom names the trusted=true caches that supplied paths no trusted key signed.
	UnsignedFrom []string
	// Resumed counts NAR transfers that continued after their connection dropped.
	Resumed int
	// Realised says the host's Nix realised the toplevel (no cache or export given).
	Realised bool
}

// candidate is a missing path and where to get it.
type candidate struct {
	info *PathInfo
	ni   *narinfo.NarInfo
	src  Source
	exp  *exportEntry
	// unsignedFrom is the trusted cache that vouches for a path no trusted key signed.
	unsignedFrom string
}

// Import makes req.Toplevel and its closure valid in the store and roots it under req.Root.
// On error nothing it fetched is kept and no root is left.
func (im *Importer) Import(ctx context.Context, req Request) (*Result, error) {
	if _, err := ParsePath(req.Toplevel); err != nil {
		return nil, fmt.Errorf("toplevel: %w", err)
	}
	if req.Export != nil && !im.policy.AllowUnsigned {
		return nil, errors.New("export streams carry no signatures, and the plugin config does not allow unsigned closures (allow_unsigned = false); deliver a signed binary cache instead")
	}
	im.gc.RLock()
	defer im.gc.RUnlock()

	if known := im.knownRequisites(req.Toplevel); known != nil {
		if res, err := im.reuse(ctx, req, known); err == nil {
			return res, nil
		}
	}
	res := &Result{}
	want, err := im.plan(ctx, req)
	if err != nil {
		return nil, err
	}
	// A nil plan is a missing toplevel with no source to fetch it from.
	if want == nil {
		r, ok := im.store.(interface {
			Realise(context.Context, string) error
		})
		if !ok {
			return nil, fmt.Errorf("toplevel %s is not in the driver's store, and the task names no binary_cache, export or substituters to fetch it from", req.Toplevel)
		}
		if err := r.Realise(ctx, req.Toplevel); err != nil {
			return nil, fmt.Errorf("toplevel %s is not in the host's Nix store and the host's Nix could not realise it: %w", req.Toplevel, err)
		}
		res.Realised = true
	}
	if err := im.fetch(ctx, req, want, res); err != nil {
		return nil, err
	}
	if err := CheckToplevel(im.store.Dir(), req.Toplevel); err != nil {
		return nil, err
	}
	if req.Root != "" {
		if err := im.store.AddRoot(ctx, req.Root, req.Toplevel); err != nil {
			return nil, fmt.Errorf("adding GC root %s: %w", req.Root, err)
		}
	}
	if res.Requisites, err = im.store.Requisites(ctx, req.Toplevel); err != nil {
		if req.Root != "" {
			_ = im.store.RemoveRoot(ctx, req.Root)
		}
		return nil, err
	}
	im.remember(req.Toplevel, res.Requisites)
	return res, nil
}

// plan finds the missing paths of the closure and where each comes from: it walks the
// references from the toplevel, stopping at valid paths (whose closures are valid), looking up
// each level's paths at once. It returns nil, and no error, when paths are missing and the
// request names no source at all.
func (im *Importer) plan(ctx context.Context, req Request) (map[string]*candidate, error) {
	var exported map[string]*exportEntry
	if req.Export != nil {
		if _, err := req.Export.Seek(0, io.SeekStart); err != nil {
			return nil, err
		}
		entries, err := readExport(req.Export)
		if err != nil {
			return nil, err
		}
		exported = make(map[string]*exportEntry, len(entries))
		for i := range entries {
			exported[entries[i].info.Path] = &entries[i]
		}
	}
	var caches []*rankedCache
	want := map[string]*candidate{}
	referrer := map[string]string{}
	frontier := []string{req.Toplevel}
	for len(frontier) > 0 {
		missing, err := im.store.Missing(ctx, frontier)
		if err != nil {
			return nil, err
		}
		var todo []string
		for _, p := range frontier {
			if missing[p] {
				todo = append(todo, p)
			}
		}
		if len(todo) == 0 {
			break
		}
		if exported == nil && len(req.Caches) == 0 {
			// Nowhere to fetch from: the toplevel may still be realised by the host's Nix.
			return nil, nil
		}
		if exported == nil && caches == nil {
			if caches, err = rankCaches(ctx, req.Caches, jobs(req), req.Event); err != nil {
				return nil, err
			}
		}
		found := make([]*candidate, len(todo))
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(jobs(req))
		for i, p := range todo {
			g.Go(func() error {
				c, err := im.locate(gctx, req, exported, caches, p)
				if err != nil {
					if by := referrer[p]; by != "" {
						return fmt.Errorf("%w (a reference of %s)", err, by)
					}
					return err
				}
				found[i] = c
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			return nil, err
		}
		var next []string
		for i, p := range todo {
			c := found[i]
			want[p] = c
			for _, r := range c.info.References {
				if _, ok := want[r]; !ok && r != p {
					if _, queued := referrer[r]; !queued {
						referrer[r] = p
						next = append(next, r)
					}
				}
			}
		}
		frontier = next
	}
	return want, nil
}

func jobs(req Request) int {
	if req.Jobs > 0 {
		return req.Jobs
	}
	return DefaultJobs
}

// locate finds where missing path p comes from: the export stream, or the first cache in
// ranked order that has it. A cache that fails with anything but "not found" or a verification
// failure is skipped from then on.
func (im *Importer) locate(ctx context.Context, req Request, exported map[string]*exportEntry, caches []*rankedCache, p string) (*candidate, error) {
	if exported != nil {
		e, ok := exported[p]
		if !ok {
			return nil, integrityf("store path %s is neither in the export stream nor in the %s store", p, im.store.Kind())
		}
		info := e.info
		return &candidate{info: &info, exp: e}, nil
	}
	var names []string
	for _, c := range caches {
		if c.isDown() != nil {
			continue
		}
		src := c.src
		ni, err := fetchNarInfo(ctx, src, p)
		if errors.Is(err, ErrNotFound) {
			names = append(names, src.String())
			continue
		}
		var ie integrityError
		if errors.As(err, &ie) || ctx.Err() != nil {
			return nil, err
		}
		if err != nil {
			c.markDown(err, req.Event)
			continue
		}
		info := &PathInfo{Path: p, NarHash: ni.NarHash.String(), NarSize: ni.NarSize}
		for _, r := range ni.References {
			info.References = append(info.References, absolute(r))
		}
		info.SignedBy = im.policy.Keys.Verify(ni)
		cand := &candidate{info: info, ni: ni, src: src}
		if len(info.SignedBy) == 0 && !im.policy.AllowUnsigned {
			if !c.trusted {
				return nil, integrityError{unsignedError(p, src, ni, im.policy.Keys)}
			}
			cand.unsignedFrom = src.String()
		}
		return cand, nil
	}
	msg := fmt.Sprintf("store path %s is in none of the binary caches", p)
	if len(names) > 0 {
		msg += " (" + strings.Join(names, ", ") + ")"
	}
	if down := downCaches(caches); down != "" {
		return nil, errors.New(msg + "; " + down)
	}
	return nil, integrityError{errors.New(msg)}
}

func unsignedError(p string, src Source, ni *narinfo.NarInfo, keys TrustedKeys) error {
	trusted := strings.Join(keys.names(), ", ")
	if trusted == "" {
		trusted = "none configured"
	}
	if len(ni.Signatures) == 0 {
		return fmt.Errorf("store path %s from %s is not signed; trusted keys: %s (set allow_unsigned in the plugin config to accept unsigned paths)", p, src, trusted)
	}
	var by []string
	for _, s := range ni.Signatures {
		by = append(by, s.Name)
	}
	return fmt.Errorf("store path %s from %s has no valid signature by a trusted key: signed by %s; trusted keys: %s", p, src, strings.Join(by, ", "), trusted)
}

// fetch stages and commits the wanted paths, holding them so that no other import fetches them
// at the same time.
func (im *Importer) fetch(ctx context.Context, req Request, want map[string]*candidate, res *Result) error {
	if len(want) == 0 {
		return nil
	}
	paths := make([]string, 0, len(want))
	for p := range want {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	if err := im.hold(ctx, paths); err != nil {
		return err
	}
	defer im.release(paths)
	// Another import may have brought some of them in while this one waited.
	missing, err := im.store.Missing(ctx, paths)
	if err != nil {
		return err
	}
	infos := map[string]*PathInfo{}
	var prog Progress
	for _, p := range paths {
		if missing[p] {
			infos[p] = want[p].info
			prog.TotalPaths++
			prog.TotalBytes += want[p].size()
		}
	}
	if len(infos) == 0 {
		return nil
	}
	order, err := topoSort(infos)
	if err != nil {
		return err
	}
	tmp, err := newTempDir(im.store)
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	var bytesDone atomic.Uint64
	var mu sync.Mutex
	signers := map[string]bool{}
	unsignedFrom := map[string]bool{}
	// Reports are made one at a time, so the last one has the totals.
	var reportMu sync.Mutex
	report := func() {
		if req.Progress == nil {
			return
		}
		reportMu.Lock()
		defer reportMu.Unlock()
		mu.Lock()
		prog.Bytes = bytesDone.Load()
		p := prog
		mu.Unlock()
		req.Progress(p)
	}
	onRead := func(n int) {
		if after := bytesDone.Add(uint64(n)); after/progressStep != (after-uint64(n))/progressStep {
			report()
		}
	}
	var resumed atomic.Int64
	stage := func(ctx context.Context, p string) error {
		c := want[p]
		n, err := im.stageOne(ctx, req, tmp, c, p == req.Toplevel, onRead)
		resumed.Add(int64(n))
		if err != nil {
			return err
		}
		mu.Lock()
		for _, s := range c.info.SignedBy {
			signers[s] = true
		}
		if c.unsignedFrom != "" {
			unsignedFrom[c.unsignedFrom] = true
		}
		prog.Paths++
		mu.Unlock()
		report()
		return nil
	}
	// The toplevel comes first, on its own, so a system that cannot run is refused before the
	// rest is fetched.
	rest := order
	if i := indexOf(order, req.Toplevel); i >= 0 {
		if err := stage(ctx, req.Toplevel); err != nil {
			return err
		}
		rest = append(append([]string(nil), order[:i]...), order[i+1:]...)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(jobs(req))
	for _, p := range rest {
		g.Go(func() error { return stage(gctx, p) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	list := make([]*PathInfo, len(order))
	for i, p := range order {
		list[i] = infos[p]
	}
	if err := im.store.commit(ctx, tmp, list); err != nil {
		return fmt.Errorf("adding %d paths to the %s store: %w", len(list), im.store.Kind(), err)
	}
	res.Fetched = len(list)
	res.Bytes = bytesDone.Load()
	res.Resumed = int(resumed.Load())
	for s := range signers {
		res.SignedBy = append(res.SignedBy, s)
	}
	sort.Strings(res.SignedBy)
	for s := range unsignedFrom {
		res.UnsignedFrom = append(res.UnsignedFrom, s)
	}
	sort.Strings(res.UnsignedFrom)
	return nil
}

func (c *candidate) size() uint64 {
	switch {
	case c.exp != nil:
		return uint64(c.exp.length)
	case c.ni.FileSize > 0:
		return c.ni.FileSize
	}
	return c.ni.NarSize
}

func indexOf(list []string, s string) int {
	for i, v := range list {
		if v == s {
			return i
		}
	}
	return -1
}

// stageOne fetches, checks and stages one path, retrying transfers from network caches. It
// returns how often a transfer resumed after a dropped connection.
func (im *Importer) stageOne(ctx context.Context, req Request, tmp string, c *candidate, toplevel bool, onRead func(int)) (int, error) {
	st, err := im.store.stage(tmp, c.info)
	if err != nil {
		return 0, err
	}
	resumed := 0
	for attempt := 1; ; attempt++ {
		var top topInfo
		n, err := im.transfer(ctx, req, c, st, onRead, func(h *nar.Header) {
			if toplevel {
				top.entry(h)
			}
		})
		resumed += n
		if err == nil && toplevel {
			err = top.check(c.info.Path)
		}
		if err == nil {
			return resumed, st.finish()
		}
		var ie integrityError
		if errors.As(err, &ie) || ctx.Err() != nil || c.src == nil || !c.src.Retryable() || attempt == fetchAttempts {
			_ = st.discard()
			return resumed, err
		}
		if derr := st.discard(); derr != nil {
			return resumed, derr
		}
		select {
		case <-ctx.Done():
			return resumed, ctx.Err()
		case <-time.After(time.Duration(attempt) * 500 * time.Millisecond):
		}
	}
}

// transfer reads one NAR into a stager and checks it against what is known of the path; it
// returns how often the transfer resumed.
func (im *Importer) transfer(ctx context.Context, req Request, c *candidate, st stager, onRead func(int), inspect func(*nar.Header)) (int, error) {
	visit := func(h *nar.Header, body io.Reader) error {
		inspect(h)
		return st.entry(h, body)
	}
	tee := func(r io.Reader) io.Reader {
		if w := st.raw(); w != nil {
			return io.TeeReader(r, w)
		}
		return r
	}
	if c.exp != nil {
		hr := newHashReader(io.NewSectionReader(req.Export, c.exp.offset, c.exp.length), onRead)
		if err := walkNAR(tee(hr), visit); err != nil {
			return 0, integrityf("store path %s in the export stream: %w", c.info.Path, err)
		}
		if got := "sha256:" + nixbase32Sum(hr); hr.n != c.info.NarSize || got != c.info.NarHash {
			return 0, integrityf("store path %s in the export stream changed while it was imported", c.info.Path)
		}
		return 0, nil
	}
	ns, err := openNAR(ctx, c.src, c.ni, onRead)
	if err != nil {
		return 0, err
	}
	defer ns.Close()
	if err := walkNAR(tee(ns), visit); err != nil {
		if ns.nar.n > c.ni.NarSize {
			return ns.resumed(), integrityf("NAR of %s from %s is larger than its NarSize %d", c.info.Path, c.src, c.ni.NarSize)
		}
		var ie integrityError
		if errors.As(err, &ie) || ctx.Err() != nil {
			return ns.resumed(), err
		}
		return ns.resumed(), fmt.Errorf("NAR of %s from %s: %w", c.info.Path, c.src, err)
	}
	return ns.resumed(), ns.verify(c.ni)
}

// hold waits until no other import holds any of paths (sorted, so two imports cannot deadlock)
// and holds them.
func (im *Importer) hold(ctx context.Context, paths []string) error {
	for i, p := range paths {
		for {
			im.mu.Lock()
			ch, busy := im.busy[p]
			if !busy {
				im.busy[p] = make(chan struct{})
				im.mu.Unlock()
				break
			}
			im.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				im.release(paths[:i])
				return ctx.Err()
			}
		}
	}
	return nil
}

func (im *Importer) release(paths []string) {
	im.mu.Lock()
	defer im.mu.Unlock()
	for _, p := range paths {
		close(im.busy[p])
		delete(im.busy, p)
	}
}

// RemoveRoot drops a GC root that Import added.
func (im *Importer) RemoveRoot(ctx context.Context, name string) error {
	im.gc.RLock()
	defer im.gc.RUnlock()
	return im.store.RemoveRoot(ctx, name)
}

// Collect removes, from the driver's own store, paths no root needs that were not used within
// grace. The host's Nix store is left to Nix's own garbage collector.
func (im *Importer) Collect(ctx context.Context, grace time.Duration) ([]string, error) {
	own, ok := im.store.(*OwnStore)
	if !ok {
		return nil, nil
	}
	im.gc.Lock()
	defer im.gc.Unlock()
	return own.collect(ctx, grace, time.Now())
}

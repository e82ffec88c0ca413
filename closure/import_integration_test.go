// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package closure

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"
	"github.com/shoenig/test/must"
)

// These tests use the closures e2e/fixtures/build.sh made with Debian's nix-bin: binary caches
// written by `nix copy --to file://` and streams written by `nix-store --export`.

func env(t *testing.T, name string) string {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		t.Fatalf("%s is not set: run the integration tests through `make test`", name)
	}
	return v
}

func closures(t *testing.T) string { return env(t, "NIXOS_NSPAWN_CLOSURES") }

// cachedToplevel is only in the fixture caches and export streams, not in the Nix store.
func cachedToplevel(t *testing.T) string {
	b, err := os.ReadFile(filepath.Join(closures(t), "cached.toplevel"))
	must.NoError(t, err)
	return strings.TrimSpace(string(b))
}

func fixturePolicy(t *testing.T) Policy {
	keys, err := ParseTrustedKeys([]string{env(t, "NIXOS_NSPAWN_CACHE_PUBLIC_KEY")})
	must.NoError(t, err)
	return Policy{Keys: keys}
}

func ownStore(t *testing.T) *OwnStore {
	s, err := NewOwnStore(filepath.Join(t.TempDir(), "store"))
	must.NoError(t, err)
	return s
}

func dirCache(t *testing.T, dir string) *DirCache {
	c, err := openDirCache(dir)
	must.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// openDirCache opens a cache directory named by its base name, as the tests' messages expect.
func openDirCache(dir string) (*DirCache, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	return NewDirCache(root, filepath.Base(dir))
}

// openURL opens the cache of a substituter URL, as the driver does.
func openURL(t *testing.T, raw string) Source {
	u, err := ParseCacheURL(raw)
	must.NoError(t, err)
	c, err := OpenCache(u, CacheConfig{})
	must.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// copyCache copies a fixture cache so a test can tamper with it.
func copyCache(t *testing.T, name string) string {
	dst := filepath.Join(t.TempDir(), name)
	out, err := exec.Command("cp", "-a", filepath.Join(closures(t), name), dst).CombinedOutput()
	must.NoError(t, err, must.Sprint(string(out)))
	return dst
}

// assertEmpty checks that a failed import left nothing in the own store: no path, metadata,
// staging or root.
func assertEmpty(t *testing.T, s *OwnStore) {
	t.Helper()
	entries, err := os.ReadDir(s.Dir())
	must.NoError(t, err)
	for _, e := range entries {
		must.SliceContains(t, []string{metaDir, rootsDir, tmpDir}, e.Name(), must.Sprint("left in the store"))
	}
	for _, d := range []string{s.metaDir(), s.rootsDir()} {
		left, err := os.ReadDir(d)
		must.NoError(t, err)
		must.SliceEmpty(t, left, must.Sprintf("left in %s", d))
	}
	tmp, err := os.ReadDir(s.tempDir())
	if err == nil {
		must.SliceEmpty(t, tmp)
	}
}

func narinfoPath(cache, p string) string {
	return filepath.Join(cache, hashPart(p)+".narinfo")
}

// resign rewrites a narinfo of a copied cache with edit applied and signs it again with the
// fixture key, so a test reaches the check behind the signature.
func resign(t *testing.T, cache, p string, edit func(ni *narinfo.NarInfo)) {
	f, err := os.Open(narinfoPath(cache, p))
	must.NoError(t, err)
	ni, err := narinfo.Parse(f)
	f.Close()
	must.NoError(t, err)
	edit(ni)
	sec, err := os.ReadFile(filepath.Join(closures(t), "key.sec"))
	must.NoError(t, err)
	sk, err := signature.LoadSecretKey(strings.TrimSpace(string(sec)))
	must.NoError(t, err)
	sig, err := sk.Sign(nil, ni.Fingerprint())
	must.NoError(t, err)
	ni.Signatures = []signature.Signature{sig}
	must.NoError(t, os.WriteFile(narinfoPath(cache, p), []byte(ni.String()), 0o644))
}

func requisites(t *testing.T, p string) []string {
	out, err := exec.Command("nix-store", "-qR", p).Output()
	must.NoError(t, err)
	paths := strings.Fields(string(out))
	sort.Strings(paths)
	return paths
}

func sha(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	must.NoError(t, err)
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

func TestImportBinaryCacheDirs(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	want := requisites(t, tiny)
	for _, c := range []string{"tiny-xz", "tiny-zstd", "tiny-none"} {
		t.Run(c, func(t *testing.T) {
			s := ownStore(t)
			im := NewImporter(s, fixturePolicy(t))
			var last Progress
			res, err := im.Import(context.Background(), Request{
				Toplevel: tiny,
				Caches:   []Source{dirCache(t, filepath.Join(closures(t), c))},
				Root:     "alloc-1",
				Progress: func(p Progress) { last = p },
			})
			must.NoError(t, err)
			must.Eq(t, want, res.Requisites)
			must.Eq(t, len(want), res.Fetched)
			must.Eq(t, []string{"nomad-driver-nixos-fixture-1"}, res.SignedBy)
			must.Eq(t, Progress{Paths: len(want), TotalPaths: len(want), Bytes: res.Bytes, TotalBytes: res.Bytes}, last)
			// Every file is the one Nix has, byte for byte.
			init, err := filepath.EvalSymlinks(filepath.Join(tiny, "init"))
			must.NoError(t, err)
			rel := strings.TrimPrefix(init, StoreDir+"/")
			must.Eq(t, sha(t, init), sha(t, filepath.Join(s.Dir(), rel)))
			must.NoError(t, CheckToplevel(s.Dir(), tiny))

			// The second allocation of the same closure fetches nothing.
			res2, err := im.Import(context.Background(), Request{
				Toplevel: tiny, Caches: []Source{dirCache(t, filepath.Join(closures(t), c))}, Root: "alloc-2",
			})
			must.NoError(t, err)
			must.Eq(t, 0, res2.Fetched)
			must.Eq(t, uint64(0), res2.Bytes)
		})
	}
}

func TestImportExportStream(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	f, err := os.Open(filepath.Join(closures(t), "tiny.export"))
	must.NoError(t, err)
	defer f.Close()

	s := ownStore(t)
	_, err = NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{Toplevel: tiny, Export: f, Root: "a"})
	must.ErrorContains(t, err, "export streams carry no signatures")
	assertEmpty(t, s)

	pol := fixturePolicy(t)
	pol.AllowUnsigned = true
	res, err := NewImporter(s, pol).Import(context.Background(), Request{Toplevel: tiny, Export: f, Root: "a"})
	must.NoError(t, err)
	must.Eq(t, requisites(t, tiny), res.Requisites)
	must.SliceEmpty(t, res.SignedBy)
	must.NoError(t, CheckToplevel(s.Dir(), tiny))
}

// cacheServer serves a cache; the first `drops` NAR responses are cut off half way. With ranges,
// a Range request gets the rest of the file (206), else the whole file again (200).
func cacheServer(t *testing.T, dir string, drops int32, ranges bool) (*httptest.Server, *atomic.Int32) {
	var dropped atomic.Int32
	files := http.FileServer(http.Dir(dir))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/nar/") && dropped.Load() < drops {
			dropped.Add(1)
			b, err := os.ReadFile(filepath.Join(dir, r.URL.Path))
			if err != nil {
				http.NotFound(w, r)
				return
			}
			status := http.StatusOK
			var from int
			if n, ok := strings.CutPrefix(r.Header.Get("Range"), "bytes="); ok && ranges {
				from, err = strconv.Atoi(strings.TrimSuffix(n, "-"))
				must.NoError(t, err)
				w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", from, len(b)-1, len(b)))
				status = http.StatusPartialContent
			}
			b = b[from:]
			w.Header().Set("Content-Length", fmt.Sprint(len(b)))
			w.WriteHeader(status)
			_, _ = w.Write(b[:len(b)/2])
			w.(http.Flusher).Flush()
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				conn.(*net.TCPConn).SetLinger(0)
				conn.Close()
			}
			return
		}
		if !ranges {
			r.Header.Del("Range")
		}
		files.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv, &dropped
}

func TestImportHTTPCache(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	dir := filepath.Join(closures(t), "tiny-xz")

	t.Run("resumes a dropped connection", func(t *testing.T) {
		srv, dropped := cacheServer(t, dir, 2, true)
		cache := openURL(t, srv.URL)
		s := ownStore(t)
		res, err := NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{Toplevel: tiny, Caches: []Source{cache}, Root: "a"})
		must.NoError(t, err)
		must.Eq(t, int32(2), dropped.Load())
		// Each dropped NAR continued where it broke off rather than starting again.
		must.Eq(t, 2, res.Resumed)
		must.Eq(t, requisites(t, tiny), res.Requisites)
	})
	t.Run("retries a dropped connection when the server cannot resume", func(t *testing.T) {
		srv, dropped := cacheServer(t, dir, 1, false)
		cache := openURL(t, srv.URL)
		s := ownStore(t)
		res, err := NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{Toplevel: tiny, Caches: []Source{cache}, Root: "a"})
		must.NoError(t, err)
		must.Eq(t, int32(1), dropped.Load())
		must.Eq(t, 0, res.Resumed)
		must.Eq(t, requisites(t, tiny), res.Requisites)
	})
	t.Run("gives up and leaves nothing", func(t *testing.T) {
		srv, dropped := cacheServer(t, dir, 1000, true)
		cache := openURL(t, srv.URL)
		s := ownStore(t)
		_, err := NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{Toplevel: tiny, Caches: []Source{cache}, Root: "a"})
		must.ErrorContains(t, err, "NAR of /nix/store/")
		// The toplevel comes first and alone: each attempt is a request and its resumes.
		must.Eq(t, int32(fetchAttempts*(1+resumeAttempts)), dropped.Load())
		assertEmpty(t, s)
	})
	t.Run("falls through to the next cache", func(t *testing.T) {
		empty := httptest.NewServer(http.NotFoundHandler())
		t.Cleanup(empty.Close)
		srv, _ := cacheServer(t, dir, 0, true)
		var caches []Source
		for _, u := range []string{empty.URL, srv.URL + "/"} {
			caches = append(caches, openURL(t, u))
		}
		_, err := NewImporter(ownStore(t), fixturePolicy(t)).Import(context.Background(), Request{Toplevel: tiny, Caches: caches})
		must.NoError(t, err)
	})
}

func TestImportRefusals(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	initPath, err := filepath.EvalSymlinks(filepath.Join(tiny, "init"))
	must.NoError(t, err)
	tinyinit := strings.Join(strings.SplitN(initPath, "/", 5)[:4], "/")

	otherKey := func(t *testing.T) Policy {
		_, pk, err := signature.GenerateKeypair("other-1", nil)
		must.NoError(t, err)
		return Policy{Keys: TrustedKeys{pk}}
	}
	for _, tc := range []struct {
		name   string
		cache  func(t *testing.T) string
		policy func(t *testing.T) Policy
		top    string
		want   string
	}{
		{
			name:   "wrong key",
			cache:  func(t *testing.T) string { return filepath.Join(closures(t), "tiny-xz") },
			policy: otherKey,
			want:   "has no valid signature by a trusted key: signed by nomad-driver-nixos-fixture-1; trusted keys: other-1",
		},
		{
			name:  "no signature",
			cache: func(t *testing.T) string { return filepath.Join(closures(t), "tiny-unsigned") },
			want:  "is not signed; trusted keys: nomad-driver-nixos-fixture-1",
		},
		{
			name: "bad signature",
			cache: func(t *testing.T) string {
				c := copyCache(t, "tiny-xz")
				b, err := os.ReadFile(narinfoPath(c, tiny))
				must.NoError(t, err)
				b = bytes.Replace(b, []byte("NarSize: "), []byte("NarSize: 1"), 1)
				must.NoError(t, os.WriteFile(narinfoPath(c, tiny), b, 0o644))
				return c
			},
			want: "has no valid signature by a trusted key",
		},
		{
			name: "tampered NAR",
			cache: func(t *testing.T) string {
				c := copyCache(t, "tiny-none")
				f, err := os.Open(narinfoPath(c, tinyinit))
				must.NoError(t, err)
				ni, err := narinfo.Parse(f)
				f.Close()
				must.NoError(t, err)
				nar := filepath.Join(c, ni.URL)
				b, err := os.ReadFile(nar)
				must.NoError(t, err)
				b[len(b)/2] ^= 0xff
				must.NoError(t, os.WriteFile(nar, b, 0o644))
				return c
			},
			want: "NAR of " + tinyinit + " from tiny-none: hash mismatch: NarHash is sha256:",
		},
		{
			name: "wrong NAR size",
			cache: func(t *testing.T) string {
				c := copyCache(t, "tiny-xz")
				resign(t, c, tinyinit, func(ni *narinfo.NarInfo) { ni.NarSize -= 8 })
				return c
			},
			want: "NAR of " + tinyinit + " from tiny-xz: NarSize is ",
		},
		{
			name: "wrong file hash",
			cache: func(t *testing.T) string {
				c := copyCache(t, "tiny-xz")
				resign(t, c, tinyinit, func(ni *narinfo.NarInfo) {
					ni.FileHash = nixhash.MustNewHashWithEncoding(nixhash.SHA256, make([]byte, 32), nixhash.NixBase32, true)
				})
				return c
			},
			want: "hash mismatch: FileHash is sha256:" + nixbase32.EncodeToString(make([]byte, 32)),
		},
		{
			name: "narinfo pointing outside the cache",
			cache: func(t *testing.T) string {
				c := copyCache(t, "tiny-xz")
				resign(t, c, tinyinit, func(ni *narinfo.NarInfo) { ni.URL = "../../../etc/passwd" })
				return c
			},
			want: `URL "../../../etc/passwd" points outside the cache`,
		},
		{
			name: "narinfo with an absolute URL",
			cache: func(t *testing.T) string {
				c := copyCache(t, "tiny-xz")
				resign(t, c, tinyinit, func(ni *narinfo.NarInfo) { ni.URL = "/etc/passwd" })
				return c
			},
			want: "points outside the cache",
		},
		{
			name: "NAR symlinked out of the cache",
			cache: func(t *testing.T) string {
				c := copyCache(t, "tiny-none")
				resign(t, c, tinyinit, func(ni *narinfo.NarInfo) { ni.URL = "nar/escape.nar" })
				must.NoError(t, os.Symlink("/etc/passwd", filepath.Join(c, "nar", "escape.nar")))
				return c
			},
			want: "escape.nar",
		},
		{
			name: "truncated NAR",
			cache: func(t *testing.T) string {
				c := copyCache(t, "tiny-xz")
				f, err := os.Open(narinfoPath(c, tinyinit))
				must.NoError(t, err)
				ni, err := narinfo.Parse(f)
				f.Close()
				must.NoError(t, err)
				must.NoError(t, os.Truncate(filepath.Join(c, ni.URL), int64(ni.FileSize/2)))
				return c
			},
			want: "NAR of " + tinyinit,
		},
		{
			name: "missing reference",
			cache: func(t *testing.T) string {
				c := copyCache(t, "tiny-xz")
				must.NoError(t, os.Remove(narinfoPath(c, tinyinit)))
				return c
			},
			want: "store path " + tinyinit + " is in none of the binary caches (tiny-xz) (a reference of " + tiny + ")",
		},
		{
			name:  "toplevel with a kernel",
			cache: func(t *testing.T) string { return filepath.Join(closures(t), "vm-xz") },
			top:   env(t, "NIXOS_NSPAWN_KERNEL_TOPLEVEL"),
			want:  "has a kernel",
		},
		{
			name:  "toplevel missing from the cache",
			cache: func(t *testing.T) string { return filepath.Join(closures(t), "vm-xz") },
			want:  "store path " + tiny + " is in none of the binary caches (vm-xz)",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pol := fixturePolicy(t)
			if tc.policy != nil {
				pol = tc.policy(t)
			}
			top := tc.top
			if top == "" {
				top = tiny
			}
			s := ownStore(t)
			c, err := openDirCache(tc.cache(t))
			must.NoError(t, err)
			defer c.Close()
			_, err = NewImporter(s, pol).Import(context.Background(), Request{Toplevel: top, Caches: []Source{c}, Root: "a"})
			must.ErrorContains(t, err, tc.want)
			assertEmpty(t, s)
		})
	}
}

// craftedCache writes a one-path binary cache around an arbitrary NAR, signed by the fixture key.
func craftedCache(t *testing.T, p string, narBytes []byte) string {
	c := t.TempDir()
	must.NoError(t, os.MkdirAll(filepath.Join(c, "nar"), 0o755))
	sum := sha256.Sum256(narBytes)
	h := nixhash.MustNewHashWithEncoding(nixhash.SHA256, sum[:], nixhash.NixBase32, true)
	url := "nar/" + nixbase32.EncodeToString(sum[:]) + ".nar"
	must.NoError(t, os.WriteFile(filepath.Join(c, url), narBytes, 0o644))
	ni := &narinfo.NarInfo{StorePath: p, URL: url, Compression: "none", FileHash: h, FileSize: uint64(len(narBytes)), NarHash: h, NarSize: uint64(len(narBytes))}
	must.NoError(t, os.WriteFile(narinfoPath(c, p), []byte(ni.String()), 0o644))
	resign(t, c, p, func(*narinfo.NarInfo) {})
	return c
}

func TestImportRefusesEscapingNARs(t *testing.T) {
	const p = "/nix/store/0c4wz9y7i9mdx8kxm4cmm1bq5nxbg3sn-evil"
	init := file("#!/bin/sh\n")
	init.exec = true
	for name, n := range map[string]tnode{
		"dot-dot":          dir(ent("..", dir(ent("etc", file("x")))), ent("init", init)),
		"absolute":         dir(ent("/etc", file("x")), ent("init", init)),
		"slash":            dir(ent("init", init), ent("x/../../../etc", file("x"))),
		"symlink then dir": dir(ent("init", init), ent("l", symlink("/etc")), ent("l", dir(ent("shadow", file("x"))))),
	} {
		t.Run(name, func(t *testing.T) {
			s := ownStore(t)
			c := dirCache(t, craftedCache(t, p, narOf(t, n)))
			_, err := NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{Toplevel: p, Caches: []Source{c}, Root: "a"})
			must.Error(t, err)
			must.StrContains(t, err.Error(), p)
			assertEmpty(t, s)
		})
	}
	t.Run("symlinks stay symlinks", func(t *testing.T) {
		s := ownStore(t)
		c := dirCache(t, craftedCache(t, p, narOf(t, dir(ent("init", init), ent("shadow", symlink("/etc/shadow"))))))
		_, err := NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{Toplevel: p, Caches: []Source{c}})
		must.NoError(t, err)
		target, err := os.Readlink(filepath.Join(s.Dir(), filepath.Base(p), "shadow"))
		must.NoError(t, err)
		must.Eq(t, "/etc/shadow", target)
	})
}

func TestImportConcurrentFetchesOnce(t *testing.T) {
	sysd := env(t, "NIXOS_NSPAWN_SYSTEMD_TOPLEVEL")
	want := requisites(t, sysd)
	s := ownStore(t)
	im := NewImporter(s, fixturePolicy(t))
	var wg sync.WaitGroup
	errs := make([]error, 2)
	fetched := make([]int, 2)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := im.Import(context.Background(), Request{
				Toplevel: sysd,
				Caches:   []Source{dirCache(t, filepath.Join(closures(t), "systemd-zstd"))},
				Root:     fmt.Sprintf("alloc-%d", i),
			})
			if err == nil && len(res.Requisites) != len(want) {
				err = fmt.Errorf("closure of %d paths, want %d", len(res.Requisites), len(want))
			}
			if err == nil {
				fetched[i] = res.Fetched
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	must.NoError(t, errs[0])
	must.NoError(t, errs[1])
	// One import fetched the closure, the other waited for it.
	must.Eq(t, len(want), fetched[0]+fetched[1])
}

func TestCollect(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	cached := cachedToplevel(t)
	s := ownStore(t)
	im := NewImporter(s, fixturePolicy(t))
	ctx := context.Background()
	_, err := im.Import(ctx, Request{Toplevel: tiny, Caches: []Source{dirCache(t, filepath.Join(closures(t), "tiny-xz"))}, Root: "used"})
	must.NoError(t, err)
	_, err = im.Import(ctx, Request{Toplevel: cached, Caches: []Source{dirCache(t, filepath.Join(closures(t), "cached-xz"))}, Root: "done"})
	must.NoError(t, err)
	must.NoError(t, im.RemoveRoot(ctx, "done"))

	removed, err := im.Collect(ctx, time.Hour)
	must.NoError(t, err)
	must.SliceEmpty(t, removed, must.Sprint("within the grace period nothing goes"))

	removed, err = im.Collect(ctx, 0)
	must.NoError(t, err)
	// tinyinit is shared with the closure still in use.
	must.Eq(t, []string{cached}, removed)
	missing, err := s.Missing(ctx, append(requisites(t, tiny), cached))
	must.NoError(t, err)
	must.MapEq(t, map[string]bool{cached: true}, missing)
	_, err = os.Lstat(filepath.Join(s.Dir(), filepath.Base(cached)))
	must.True(t, os.IsNotExist(err))
}

// The host's Nix store: paths are imported through nix-store, so Nix knows them as valid.
func TestImportHostNixStore(t *testing.T) {
	cached := cachedToplevel(t)
	nixStore, err := exec.LookPath("nix-store")
	must.NoError(t, err)
	must.True(t, HostNixUsable(nixStore))
	deleteCached := func() {
		_ = exec.Command(nixStore, "--delete", cached).Run()
		must.Error(t, exec.Command(nixStore, "--check-validity", cached).Run(), must.Sprint("the fixture is still in the store"))
	}
	for _, way := range []string{"cache", "export", "realise"} {
		t.Run(way, func(t *testing.T) {
			deleteCached()
			t.Cleanup(deleteCached)
			data := t.TempDir()
			s, err := NewNixStore(nixStore, filepath.Join(data, "gcroots"), filepath.Join(data, "tmp"))
			must.NoError(t, err)
			pol := fixturePolicy(t)
			req := Request{Toplevel: cached, Root: "alloc-1"}
			switch way {
			case "cache":
				req.Caches = []Source{dirCache(t, filepath.Join(closures(t), "cached-xz"))}
			case "realise":
				// No cache or export: the host's Nix realises the path from its own substituters.
				t.Setenv("NIX_CONFIG", "substituters = file://"+filepath.Join(closures(t), "cached-xz")+"\ntrusted-public-keys = "+env(t, "NIXOS_NSPAWN_CACHE_PUBLIC_KEY"))
			default:
				pol.AllowUnsigned = true
				f, err := os.Open(filepath.Join(closures(t), "cached.export"))
				must.NoError(t, err)
				defer f.Close()
				req.Export = f
			}
			im := NewImporter(s, pol)
			res, err := im.Import(context.Background(), req)
			must.NoError(t, err)
			if way == "realise" {
				must.True(t, res.Realised)
			} else {
				must.Eq(t, 1, res.Fetched)
			}
			must.NoError(t, exec.Command(nixStore, "--check-validity", cached).Run())
			must.Eq(t, requisites(t, cached), res.Requisites)
			// The machine's link is the driver's record; Nix refuses to delete the path for the
			// closure's root in its gcroots.
			link := filepath.Join(data, "gcroots", "alloc-1")
			target, err := os.Readlink(link)
			must.NoError(t, err)
			must.Eq(t, cached, target)
			must.Error(t, exec.Command(nixStore, "--delete", cached).Run())
			closureRoot := s.closureRoot(cached)
			roots, err := exec.Command(nixStore, "--query", "--roots", cached).Output()
			must.NoError(t, err)
			must.StrContains(t, string(roots), closureRoot)
			must.NoError(t, im.RemoveRoot(context.Background(), "alloc-1"))
			for _, l := range []string{link, closureRoot} {
				_, err = os.Lstat(l)
				must.True(t, os.IsNotExist(err), must.Sprint(l))
			}
			left, err := os.ReadDir(filepath.Join(data, "tmp"))
			if err == nil {
				must.SliceEmpty(t, left)
			}
		})
	}
}

// An import interrupted by the plugin's death leaves staging and perhaps a path without its
// metadata; neither counts as valid, and the next store open and import clean them up.
func TestInterruptedImportIsNotValid(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	dir := filepath.Join(t.TempDir(), "store")
	s, err := NewOwnStore(dir)
	must.NoError(t, err)
	staging := filepath.Join(s.tempDir(), "import-1", filepath.Base(tiny))
	must.NoError(t, os.MkdirAll(staging, 0o755))
	half := filepath.Join(dir, filepath.Base(tiny))
	must.NoError(t, os.MkdirAll(half, 0o755))

	s, err = NewOwnStore(dir)
	must.NoError(t, err)
	_, err = os.Stat(s.tempDir())
	must.True(t, os.IsNotExist(err), must.Sprint("staging of the interrupted import is gone"))
	missing, err := s.Missing(context.Background(), []string{tiny})
	must.NoError(t, err)
	must.True(t, missing[tiny], must.Sprint("a path without metadata is not valid"))

	_, err = NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{
		Toplevel: tiny, Caches: []Source{dirCache(t, filepath.Join(closures(t), "tiny-xz"))},
	})
	must.NoError(t, err)
	must.NoError(t, CheckToplevel(dir, tiny))
}

// A toplevel imported before is rooted again without nix-store (the first import called it to
// check validity and query the closure): its closure is known, and the driver writes the root.
// Once the path left the store, the next import fetches it as the first did.
func TestImportReusesKnownClosure(t *testing.T) {
	cached := cachedToplevel(t)
	nixStore, err := exec.LookPath("nix-store")
	must.NoError(t, err)
	deleteCached := func() {
		_ = exec.Command(nixStore, "--delete", cached).Run()
		must.Error(t, exec.Command(nixStore, "--check-validity", cached).Run(), must.Sprint("the fixture is still in the store"))
	}
	deleteCached()
	t.Cleanup(deleteCached)
	data := t.TempDir()
	calls := filepath.Join(data, "calls")
	wrapper := filepath.Join(data, "nix-store")
	must.NoError(t, os.WriteFile(wrapper, []byte("#!/bin/sh\necho \"$1\" >>"+calls+"\nexec "+nixStore+" \"$@\"\n"), 0o755))
	s, err := NewNixStore(wrapper, filepath.Join(data, "gcroots"), filepath.Join(data, "tmp"))
	must.NoError(t, err)
	im := NewImporter(s, fixturePolicy(t))
	req := Request{Toplevel: cached, Root: "alloc-1", Caches: []Source{dirCache(t, filepath.Join(closures(t), "cached-xz"))}}
	called := func() []string {
		b, _ := os.ReadFile(calls)
		must.NoError(t, os.RemoveAll(calls))
		return strings.Fields(string(b))
	}

	called()
	res, err := im.Import(context.Background(), req)
	must.NoError(t, err)
	must.Eq(t, 1, res.Fetched)
	first := called()
	must.SliceContains(t, first, "--check-validity")
	must.SliceContains(t, first, "--query")

	second := req
	second.Root = "alloc-2"
	res, err = im.Import(context.Background(), second)
	must.NoError(t, err)
	must.Eq(t, requisites(t, cached), res.Requisites)
	must.SliceEmpty(t, called())
	must.NoError(t, im.RemoveRoot(context.Background(), "alloc-1"))
	must.Error(t, exec.Command(nixStore, "--delete", cached).Run(), must.Sprint("alloc-2 still roots the closure"))
	must.NoError(t, im.RemoveRoot(context.Background(), "alloc-2"))

	res, err = im.Import(context.Background(), req)
	must.NoError(t, err)
	must.Eq(t, 0, res.Fetched)
	must.Eq(t, requisites(t, cached), res.Requisites)
	must.SliceEmpty(t, called())
	must.Error(t, exec.Command(nixStore, "--delete", cached).Run(), must.Sprint("the closure's root in Nix's gcroots holds it"))
	target, err := os.Readlink(filepath.Join(data, "gcroots", "alloc-1"))
	must.NoError(t, err)
	must.Eq(t, cached, target)
	must.NoError(t, im.RemoveRoot(context.Background(), "alloc-1"))

	deleteCached()
	res, err = im.Import(context.Background(), req)
	must.NoError(t, err)
	must.Eq(t, 1, res.Fetched)
	must.NoError(t, im.RemoveRoot(context.Background(), "alloc-1"))
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
)

func TestParseCacheURL(t *testing.T) {
	u, err := ParseCacheURL("https://cache.example.org/nix/")
	must.NoError(t, err)
	must.Eq(t, "https://cache.example.org/nix", u.String())
	must.Eq(t, "https://cache.example.org/nix/", u.Raw())
	must.Eq(t, CacheParams{}, u.Params())

	u, err = ParseCacheURL("s3://nix-cache?region=eu-west-1&priority=30&endpoint=minio.local:9000&scheme=http&trusted=1&want-mass-query=true")
	must.NoError(t, err)
	must.Eq(t, CacheParams{Priority: 30, HasPriority: true, Trusted: true, WantMassQuery: true}, u.Params())
	// Parameters in a fixed order: two spellings of one cache compare equal.
	must.Eq(t, "s3://nix-cache?endpoint=minio.local:9000&priority=30&region=eu-west-1&scheme=http&trusted=1&want-mass-query=true", u.String())
	must.Eq(t, "s3://nix-cache?endpoint=minio.local:9000&region=eu-west-1&scheme=http", u.Identity())

	for raw, want := range map[string]string{
		"cache.example.org":                 "must start with one of file://, http://, https://, s3://",
		"ftp://bucket":                      "must start with one of file://, http://, https://, s3://",
		"https://a@cache":                   "without user or fragment",
		"https://c#x":                       "without user or fragment",
		"https://c?x=1":                     `unknown parameter "x"; a https:// cache takes priority, want-mass-query, trusted`,
		"https://c?region=eu":               `unknown parameter "region"`,
		"https://c?priority=high":           `priority="high" must be an integer`,
		"https://c?priority=1&priority=2":   `parameter "priority" is given 2 times`,
		"https://c?trusted=yes":             `trusted="yes" must be true or false`,
		"https:///no-host":                  "has no host",
		"http://[::1":                       "is not a URL",
		"s3://?region=eu-west-1":            "has no bucket",
		"file://cache.example.org/srv":      `names host "cache.example.org"`,
		"file:///srv/../etc":                "must name an absolute, clean directory path",
		"file://?priority=1":                "must name an absolute, clean directory path",
		"s3://bucket/prefix":                `has a path "/prefix"`,
		"s3://bucket?scheme=ftp":            `scheme="ftp" must be http or https`,
		"s3://bucket?endpoint=ftp://x":      `endpoint="ftp://x" must be a host[:port] or an http(s) URL`,
		"s3://bucket?profile=a&sse=aws:kms": `a s3:// cache takes priority, want-mass-query, trusted, region, endpoint, profile, scheme`,
	} {
		_, err := ParseCacheURL(raw)
		must.ErrorContains(t, err, want)
		must.ErrorContains(t, err, `"`+raw+`"`)
	}
	// A password written into a URL is refused without being repeated.
	_, err = ParseCacheURL("https://ci:s3cret@cache.example.org")
	must.ErrorContains(t, err, "credentials go in the plugin config")
	must.StrNotContains(t, err.Error(), "s3cret")
}

func TestParseCacheURLs(t *testing.T) {
	urls, err := ParseCacheURLs("substituters", nil)
	must.NoError(t, err)
	must.Nil(t, urls)
	_, err = ParseCacheURLs("substituters", []string{"https://a", "ftp://b"})
	must.ErrorContains(t, err, `substituters[1] = "ftp://b"`)
}

func TestOpenCacheByScheme(t *testing.T) {
	for raw, name := range map[string]string{
		"http://127.0.0.1:1/cache":                             "http://127.0.0.1:1/cache",
		"https://cache.example.org?priority=10":                "https://cache.example.org?priority=10",
		"s3://bucket?endpoint=127.0.0.1:1&scheme=http":         "s3://bucket?endpoint=127.0.0.1:1&scheme=http",
		"s3://bucket?region=eu-central-1&trusted=1&priority=5": "s3://bucket?region=eu-central-1",
	} {
		u, err := ParseCacheURL(raw)
		must.NoError(t, err)
		c, err := OpenCache(u, CacheConfig{})
		must.NoError(t, err)
		must.Eq(t, name, c.String())
		must.True(t, c.Retryable())
		must.Eq(t, u.Params(), c.(parameterized).params())
		_, ok := c.(resumer)
		must.True(t, ok)
		must.NoError(t, c.Close())
	}
	_, err := OpenCache(CacheURL{}, CacheConfig{})
	must.Error(t, err)

	// A directory: read where it is, not retried, ranked by its parameters.
	dir := t.TempDir()
	must.NoError(t, os.WriteFile(filepath.Join(dir, "nix-cache-info"), []byte("StoreDir: /nix/store\n"), 0o644))
	u, err := ParseCacheURL("file://" + dir + "/?priority=5")
	must.NoError(t, err)
	c, err := OpenCache(u, CacheConfig{})
	must.NoError(t, err)
	must.Eq(t, "file://"+dir, c.String())
	must.False(t, c.Retryable())
	must.Eq(t, CacheParams{Priority: 5, HasPriority: true}, c.(parameterized).params())
	must.NoError(t, c.Close())
	u, err = ParseCacheURL("file://" + dir + "/missing")
	must.NoError(t, err)
	_, err = OpenCache(u, CacheConfig{})
	must.ErrorContains(t, err, "file://"+dir+"/missing: ")
}

func TestOpenCacheCredentialErrorsHoldNoSecret(t *testing.T) {
	dir := t.TempDir()
	u, err := ParseCacheURL("https://attic.example.org/ci")
	must.NoError(t, err)
	secret := "tok-3f9a1c"
	two := filepath.Join(dir, "two-lines")
	must.NoError(t, os.WriteFile(two, []byte(secret+"\n"+secret+"\n"), 0o600))
	_, err = OpenCache(u, CacheConfig{BearerTokenFiles: map[string]string{u.Identity(): two}})
	must.ErrorContains(t, err, "must hold one token on one line")
	must.StrNotContains(t, err.Error(), secret)

	bad := filepath.Join(dir, "netrc")
	must.NoError(t, os.WriteFile(bad, []byte("machine attic.example.org login ci passwd "+secret+"\n"), 0o600))
	_, err = OpenCache(u, CacheConfig{NetrcFile: bad})
	must.ErrorContains(t, err, "line 1: unknown netrc keyword")
	must.StrNotContains(t, err.Error(), secret)
}

func TestParseNetrc(t *testing.T) {
	n, err := parseNetrc(`# Attic and Cachix tokens
machine attic.example.org login ci password tok1
machine attic.example.org login other password ignored
machine CACHE.example.org
  login bob
  password tok2
macdef init
  cd /pub

default login anon password anon
`)
	must.NoError(t, err)
	e, ok := n.lookup("attic.example.org")
	must.True(t, ok)
	must.Eq(t, netrcEntry{"ci", "tok1"}, e)
	e, _ = n.lookup("cache.example.org")
	must.Eq(t, netrcEntry{"bob", "tok2"}, e)
	e, _ = n.lookup("elsewhere.example.org")
	must.Eq(t, netrcEntry{"anon", "anon"}, e)

	n, err = parseNetrc("machine a login x password y\n")
	must.NoError(t, err)
	_, ok = n.lookup("b")
	must.False(t, ok)

	_, err = parseNetrc("login x password y\n")
	must.ErrorContains(t, err, `line 1: "login" before any machine or default`)
	_, err = parseNetrc("machine a login x\npassword\n")
	must.ErrorContains(t, err, `line 2: "password" needs a value on the same line`)
}

func TestParseCacheInfo(t *testing.T) {
	info, err := parseCacheInfo(strings.NewReader("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"))
	must.NoError(t, err)
	must.Eq(t, CacheInfo{Priority: 40, HasPriority: true, WantMassQuery: true}, info)
	_, err = parseCacheInfo(strings.NewReader("StoreDir: /gnu/store\n"))
	must.ErrorContains(t, err, `the cache is for store "/gnu/store"`)
	_, err = parseCacheInfo(strings.NewReader("Priority: first\n"))
	must.ErrorContains(t, err, `Priority "first" is not an integer`)
}

// fakeSource is a cache in memory, for the ranking logic.
type fakeSource struct {
	name  string
	files map[string]string
	err   error
	par   CacheParams
}

func (f *fakeSource) String() string      { return f.name }
func (f *fakeSource) Retryable() bool     { return true }
func (f *fakeSource) Close() error        { return nil }
func (f *fakeSource) params() CacheParams { return f.par }
func (f *fakeSource) Open(_ context.Context, rel string) (io.ReadCloser, error) {
	if f.err != nil {
		return nil, f.err
	}
	s, ok := f.files[rel]
	if !ok {
		return nil, ErrNotFound
	}
	return io.NopCloser(strings.NewReader(s)), nil
}

func TestRankCaches(t *testing.T) {
	info := func(p string) map[string]string {
		return map[string]string{"nix-cache-info": "StoreDir: /nix/store\nPriority: " + p + "\n"}
	}
	caches := []Source{
		&fakeSource{name: "official", files: info("40")},
		&fakeSource{name: "no-info"},
		&fakeSource{name: "override", files: info("40"), par: CacheParams{Priority: 10, HasPriority: true, Trusted: true}},
		&fakeSource{name: "down", err: errors.New("connection refused")},
		&fakeSource{name: "also-no-info"},
	}
	var events []string
	ranked, err := rankCaches(context.Background(), caches, 2, func(s string) { events = append(events, s) })
	must.NoError(t, err)
	var order []string
	for _, c := range ranked {
		order = append(order, c.src.String())
	}
	// As Nix: lowest first, the URL's priority over nix-cache-info's, 0 without either, stable.
	must.Eq(t, []string{"no-info", "down", "also-no-info", "override", "official"}, order)
	must.True(t, ranked[3].trusted)
	must.Error(t, ranked[1].isDown())
	must.Eq(t, []string{"binary cache down skipped: connection refused"}, events)
	must.StrContains(t, downCaches(ranked), "down could not be used: connection refused")

	// A cache not opened from a URL, a task's directory, comes first whatever the others say.
	dir := &DirCache{name: "binary_cache local/closure"}
	ranked, err = rankCaches(context.Background(), []Source{caches[2], dir}, 2, nil)
	must.NoError(t, err)
	must.Eq(t, dir, ranked[0].src.(*DirCache))

	_, err = rankCaches(context.Background(), []Source{&fakeSource{name: "guix", files: map[string]string{"nix-cache-info": "StoreDir: /gnu/store\n"}}}, 1, nil)
	must.ErrorContains(t, err, `guix: nix-cache-info: the cache is for store "/gnu/store"`)
}

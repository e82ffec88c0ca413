// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"testing"

	"github.com/shoenig/test/must"
)

func TestParseCacheURL(t *testing.T) {
	u, err := ParseCacheURL("https://cache.example.org/nix/")
	must.NoError(t, err)
	must.Eq(t, "https://cache.example.org/nix", u.String())
	must.Eq(t, "https://cache.example.org/nix/", u.Raw())

	for raw, want := range map[string]string{
		"cache.example.org": "must start with one of http://, https://",
		"s3://bucket":       "must start with one of http://, https://",
		"https://a:b@cache": "without user, query or fragment",
		"https://c?x=1":     "without user, query or fragment",
		"https:///no-host":  "has no host",
		"http://[::1":       "is not a URL",
	} {
		_, err := ParseCacheURL(raw)
		must.ErrorContains(t, err, want)
		must.ErrorContains(t, err, `"`+raw+`"`)
	}
}

func TestParseCacheURLs(t *testing.T) {
	urls, err := ParseCacheURLs("substituters", nil)
	must.NoError(t, err)
	must.Nil(t, urls)
	_, err = ParseCacheURLs("substituters", []string{"https://a", "ftp://b"})
	must.ErrorContains(t, err, `substituters[1] = "ftp://b"`)
}

func TestOpenCacheByScheme(t *testing.T) {
	for _, raw := range []string{"http://127.0.0.1:1/cache", "https://cache.example.org"} {
		u, err := ParseCacheURL(raw)
		must.NoError(t, err)
		c, err := OpenCache(u)
		must.NoError(t, err)
		must.Eq(t, raw, c.String())
		must.True(t, c.Retryable())
		must.NoError(t, c.Close())
	}
	_, err := OpenCache(CacheURL{})
	must.Error(t, err)
}

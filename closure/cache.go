// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strings"
)

// ErrNotFound is a cache's answer for a file it does not have.
var ErrNotFound = errors.New("not found")

// Source is a binary cache: a directory or server with <hash>.narinfo files and the NARs they
// point to, as `nix copy --to` writes it. A new kind of cache implements it and registers an
// opener in openers.
type Source interface {
	// String names the cache in messages; it never holds credentials.
	String() string
	// Open returns the file at a path relative to the cache's root, or ErrNotFound.
	Open(ctx context.Context, rel string) (io.ReadCloser, error)
	// Retryable says whether a failed transfer is worth repeating (network caches).
	Retryable() bool
	// Close releases what the cache holds open.
	Close() error
}

// CacheURL is a substituter URL that ParseCacheURL accepted.
type CacheURL struct {
	u   *url.URL
	raw string
}

// Raw is the URL as it was written, for messages.
func (c CacheURL) Raw() string { return c.raw }

// String is the URL in its normal form: two spellings of one cache compare equal.
func (c CacheURL) String() string { return c.u.String() }

// opener makes a cache of one URL scheme; parse checks a URL of that scheme once, up front.
type opener struct {
	parse func(u *url.URL) error
	open  func(u *url.URL) (Source, error)
}

// openers are the cache kinds by URL scheme.
var openers = map[string]opener{
	"http":  {parse: checkHTTPURL, open: openHTTPCache},
	"https": {parse: checkHTTPURL, open: openHTTPCache},
}

func schemes() string {
	names := make([]string, 0, len(openers))
	for s := range openers {
		names = append(names, s+"://")
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// ParseCacheURL checks a substituter URL and brings it into its normal form.
func ParseCacheURL(raw string) (CacheURL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return CacheURL{}, fmt.Errorf("%q is not a URL: %w", raw, err)
	}
	o, ok := openers[u.Scheme]
	if !ok {
		return CacheURL{}, fmt.Errorf("%q: a binary cache URL must start with one of %s", raw, schemes())
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return CacheURL{}, fmt.Errorf("%q must be a binary cache URL without user, query or fragment", raw)
	}
	if err := o.parse(u); err != nil {
		return CacheURL{}, fmt.Errorf("%q %w", raw, err)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	return CacheURL{u: u, raw: raw}, nil
}

// ParseCacheURLs parses a list, naming the field and index of a bad entry.
func ParseCacheURLs(field string, raws []string) ([]CacheURL, error) {
	var urls []CacheURL
	for i, raw := range raws {
		u, err := ParseCacheURL(raw)
		if err != nil {
			return nil, fmt.Errorf("%s[%d] = %w", field, i, err)
		}
		urls = append(urls, u)
	}
	return urls, nil
}

// OpenCache makes the cache a URL names; it contacts nothing until the cache is first read.
func OpenCache(c CacheURL) (Source, error) {
	if c.u == nil {
		return nil, errors.New("empty binary cache URL")
	}
	u := *c.u
	return openers[u.Scheme].open(&u)
}

func checkHTTPURL(u *url.URL) error {
	if u.Host == "" {
		return errors.New("has no host")
	}
	return nil
}

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
	"strconv"
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

// resumer is a Source that can continue a file from an offset, so a dropped NAR resumes where it
// broke off. errNoResume says the server cannot.
type resumer interface {
	OpenFrom(ctx context.Context, rel string, offset int64) (io.ReadCloser, error)
}

var errNoResume = errors.New("the cache cannot resume a transfer")

// CacheParams are Nix's store URL parameters that every kind of cache takes.
type CacheParams struct {
	// Priority orders the caches, lowest first; unset, nix-cache-info's Priority applies, else 0.
	Priority    int
	HasPriority bool
	// WantMassQuery is accepted for URLs copied from nix.conf; the driver asks a cache only for
	// the paths it needs, as Nix does when it substitutes.
	WantMassQuery bool
	// Trusted accepts paths from the cache that no trusted key signed.
	Trusted bool
}

// parameterized is a Source opened from a URL, with its parameters.
type parameterized interface{ params() CacheParams }

// CacheURL is a substituter URL that ParseCacheURL accepted.
type CacheURL struct {
	u      *url.URL
	raw    string
	params CacheParams
}

// Raw is the URL as it was written, for messages.
func (c CacheURL) Raw() string { return c.raw }

// String is the URL in its normal form: two spellings of one cache compare equal.
func (c CacheURL) String() string { return c.u.String() }

// Identity is the normal form without Nix's parameters: it names the cache itself, whatever
// priority or trust it is given.
func (c CacheURL) Identity() string {
	u := *c.u
	q := u.Query()
	for _, p := range nixParams {
		q.Del(p)
	}
	u.RawQuery = encodeQuery(q)
	return u.String()
}

// encodeQuery writes parameters sorted by name, keeping ':' (allowed in a query) as it is, so
// that endpoint=host:port reads as written.
func encodeQuery(q url.Values) string {
	return strings.ReplaceAll(q.Encode(), "%3A", ":")
}

// Params are the URL's Nix parameters.
func (c CacheURL) Params() CacheParams { return c.params }

// CacheConfig is what the plugin config says about every cache: the credentials (never in a
// message) and how many transfers may run at once.
type CacheConfig struct {
	// NetrcFile is a netrc file, as Nix's netrc-file setting names one.
	NetrcFile string
	// BearerTokenFiles maps a cache's Identity to a file holding its bearer token.
	BearerTokenFiles map[string]string
	// AWSCredentialsFile is a shared credentials file for s3:// caches, before the standard chain's.
	AWSCredentialsFile string
	// Connections bounds the connections to one cache.
	Connections int
}

// opener makes a cache of one URL scheme; parse checks a URL of that scheme once, up front, and
// params are the query parameters it takes besides nixParams.
type opener struct {
	parse  func(u *url.URL) error
	params []string
	open   func(c CacheURL, cfg CacheConfig) (Source, error)
}

// openers are the cache kinds by URL scheme.
var openers = map[string]opener{
	"file":  {parse: checkFileURL, open: openFileCache},
	"http":  {parse: checkHTTPURL, open: openHTTPCache},
	"https": {parse: checkHTTPURL, open: openHTTPCache},
	"s3":    {parse: checkS3URL, params: s3Params, open: openS3Cache},
}

// nixParams are the store URL parameters of every Nix store.
var nixParams = []string{"priority", "want-mass-query", "trusted"}

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
		return CacheURL{}, fmt.Errorf("%q is not a URL: %w", raw, redactURLError(err))
	}
	o, ok := openers[u.Scheme]
	if !ok {
		return CacheURL{}, fmt.Errorf("%q: a binary cache URL must start with one of %s", raw, schemes())
	}
	if u.User != nil || u.Fragment != "" {
		return CacheURL{}, fmt.Errorf("%q must be a binary cache URL without user or fragment; credentials go in the plugin config's netrc_file, bearer_token or aws_credentials_file", redact(raw, u))
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return CacheURL{}, fmt.Errorf("%q: bad query: %w", raw, err)
	}
	allowed := append(append([]string(nil), nixParams...), o.params...)
	c := CacheURL{raw: raw}
	for k, vs := range q {
		if !contains(allowed, k) {
			return CacheURL{}, fmt.Errorf("%q: unknown parameter %q; a %s:// cache takes %s", raw, k, u.Scheme, strings.Join(allowed, ", "))
		}
		if len(vs) != 1 {
			return CacheURL{}, fmt.Errorf("%q: parameter %q is given %d times", raw, k, len(vs))
		}
		v := vs[0]
		switch k {
		case "priority":
			if c.params.Priority, err = strconv.Atoi(v); err != nil {
				return CacheURL{}, fmt.Errorf("%q: priority=%q must be an integer (lower is asked first)", raw, v)
			}
			c.params.HasPriority = true
		case "want-mass-query", "trusted":
			b, ok := nixBool(v)
			if !ok {
				return CacheURL{}, fmt.Errorf("%q: %s=%q must be true or false (1 or 0)", raw, k, v)
			}
			if k == "trusted" {
				c.params.Trusted = b
			} else {
				c.params.WantMassQuery = b
			}
		}
	}
	u.RawQuery = encodeQuery(q)
	if err := o.parse(u); err != nil {
		return CacheURL{}, fmt.Errorf("%q %w", raw, err)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	c.u = u
	return c, nil
}

func nixBool(v string) (bool, bool) {
	switch v {
	case "true", "1":
		return true, true
	case "false", "0":
		return false, true
	}
	return false, false
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// redact hides a password written into a URL, so that no message repeats it.
func redact(raw string, u *url.URL) string {
	if _, ok := u.User.Password(); ok {
		return u.Redacted()
	}
	return raw
}

// redactURLError drops the URL url.Parse puts into its error: it may hold a password.
func redactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
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
func OpenCache(c CacheURL, cfg CacheConfig) (Source, error) {
	if c.u == nil {
		return nil, errors.New("empty binary cache URL")
	}
	u := *c.u
	c.u = &u
	return openers[u.Scheme].open(c, cfg)
}

func checkHTTPURL(u *url.URL) error {
	if u.Host == "" {
		return errors.New("has no host")
	}
	return nil
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// HTTPCache is a binary cache served over HTTP(S) in the standard layout (cache.nixos.org's,
// nix-serve's, or a static file server in front of a `nix copy --to file://` directory).
type HTTPCache struct {
	base   *url.URL
	client *http.Client

	// info is the check of nix-cache-info, made on first use so that an unneeded cache is
	// never contacted.
	info    sync.Once
	infoErr error
}

// httpHeaderTimeout bounds the wait for a response; bodies may take as long as they need.
const httpHeaderTimeout = 30 * time.Second

// NewHTTPCache checks the URL; the cache's nix-cache-info is checked when it is first used.
func NewHTTPCache(rawURL string, client *http.Client) (*HTTPCache, error) {
	u, err := ParseCacheURL(rawURL)
	if err != nil {
		return nil, err
	}
	if client == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.ResponseHeaderTimeout = httpHeaderTimeout
		client = &http.Client{Transport: t}
	}
	return &HTTPCache{base: u, client: client}, nil
}

func (c *HTTPCache) checkInfo(ctx context.Context) error {
	rc, err := c.get(ctx, "nix-cache-info")
	switch {
	case errors.Is(err, errNotFound):
		return nil
	case err != nil:
		return err
	}
	defer rc.Close()
	if err := parseCacheInfo(rc); err != nil {
		return integrityf("%s: %w", c, err)
	}
	return nil
}

// ParseCacheURL accepts http and https URLs without user info, query or fragment.
func ParseCacheURL(rawURL string) (*url.URL, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("%q must be an http:// or https:// URL of a binary cache, without user, query or fragment", rawURL)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	return u, nil
}

func (c *HTTPCache) String() string { return c.base.String() }

func (c *HTTPCache) retryable() bool { return true }

func (c *HTTPCache) open(ctx context.Context, rel string) (io.ReadCloser, error) {
	c.info.Do(func() { c.infoErr = c.checkInfo(ctx) })
	if c.infoErr != nil {
		return nil, c.infoErr
	}
	return c.get(ctx, rel)
}

func (c *HTTPCache) get(ctx context.Context, rel string) (io.ReadCloser, error) {
	u := *c.base
	u.Path += "/" + rel
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, err
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		return resp.Body, nil
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden:
		resp.Body.Close()
		return nil, errNotFound
	}
	resp.Body.Close()
	return nil, fmt.Errorf("GET %s: %s", u.String(), resp.Status)
}

// parseCacheInfo refuses a cache whose StoreDir is not /nix/store.
func parseCacheInfo(r io.Reader) error {
	sc := bufio.NewScanner(io.LimitReader(r, 64<<10))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && k == "StoreDir" && strings.TrimSpace(v) != StoreDir {
			return fmt.Errorf("nix-cache-info: the cache is for store %q, not %s", strings.TrimSpace(v), StoreDir)
		}
	}
	return sc.Err()
}

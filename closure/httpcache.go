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

// openHTTPCache makes the cache of a URL ParseCacheURL accepted; its nix-cache-info is checked when
// it is first used, so an unneeded cache is never contacted.
func openHTTPCache(u *url.URL) (Source, error) {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.ResponseHeaderTimeout = httpHeaderTimeout
	return &HTTPCache{base: u, client: &http.Client{Transport: t}}, nil
}

func (c *HTTPCache) checkInfo(ctx context.Context) error {
	rc, err := c.get(ctx, "nix-cache-info")
	switch {
	case errors.Is(err, ErrNotFound):
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

func (c *HTTPCache) String() string { return c.base.String() }

func (c *HTTPCache) Retryable() bool { return true }

// Close ends the cache's idle connections.
func (c *HTTPCache) Close() error {
	c.client.CloseIdleConnections()
	return nil
}

func (c *HTTPCache) Open(ctx context.Context, rel string) (io.ReadCloser, error) {
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
		return nil, ErrNotFound
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

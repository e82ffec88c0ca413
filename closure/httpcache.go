// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"bufio"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// HTTPCache is a binary cache served over HTTP(S) in the standard layout (cache.nixos.org's,
// nix-serve's, Harmonia's, Attic's, Cachix's, or a static file server in front of a
// `nix copy --to file://` directory).
type HTTPCache struct {
	base   *url.URL
	client *http.Client
	param  CacheParams
	// auth sets the request's credentials; nil for a public cache.
	auth func(*http.Request)
}

// httpHeaderTimeout bounds the wait for a response; bodies may take as long as they need.
const httpHeaderTimeout = 30 * time.Second

// openHTTPCache makes the cache of a URL ParseCacheURL accepted. Its credentials are read now,
// so a rotated token counts from the next task on; nothing is contacted until first use.
func openHTTPCache(c CacheURL, cfg CacheConfig) (Source, error) {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.ResponseHeaderTimeout = httpHeaderTimeout
	if cfg.Connections > 0 {
		t.MaxIdleConnsPerHost = cfg.Connections
		t.MaxConnsPerHost = cfg.Connections
	}
	hc := &HTTPCache{base: c.u, client: &http.Client{Transport: t}, param: c.params}
	if file := cfg.BearerTokenFiles[c.Identity()]; file != "" {
		token, err := ReadTokenFile(file)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", c.Identity(), err)
		}
		hc.auth = func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+token) }
	} else if cfg.NetrcFile != "" {
		b, err := os.ReadFile(cfg.NetrcFile)
		if err != nil {
			return nil, fmt.Errorf("netrc_file: %w", err)
		}
		entries, err := parseNetrc(string(b))
		if err != nil {
			return nil, fmt.Errorf("netrc_file %s: %w", cfg.NetrcFile, err)
		}
		if e, ok := entries.lookup(c.u.Hostname()); ok {
			hc.auth = func(r *http.Request) { r.SetBasicAuth(e.login, e.password) }
		}
	}
	return hc, nil
}

// ReadTokenFile reads a bearer token: the file's content without surrounding white space. Its
// errors never hold the token.
func ReadTokenFile(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("bearer token file: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" || strings.ContainsAny(token, "\r\n\x00") {
		return "", fmt.Errorf("bearer token file %s must hold one token on one line", file)
	}
	return token, nil
}

func (c *HTTPCache) String() string { return c.base.String() }

func (c *HTTPCache) Retryable() bool { return true }

func (c *HTTPCache) params() CacheParams { return c.param }

// Close ends the cache's idle connections.
func (c *HTTPCache) Close() error {
	c.client.CloseIdleConnections()
	return nil
}

func (c *HTTPCache) Open(ctx context.Context, rel string) (io.ReadCloser, error) {
	return c.get(ctx, rel, 0)
}

// OpenFrom asks for the file from offset on, without a content encoding so that offsets are
// the file's.
func (c *HTTPCache) OpenFrom(ctx context.Context, rel string, offset int64) (io.ReadCloser, error) {
	return c.get(ctx, rel, offset)
}

func (c *HTTPCache) get(ctx context.Context, rel string, offset int64) (io.ReadCloser, error) {
	u := *c.base
	u.Path += "/" + rel
	u.RawQuery = ""
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	// Set here, Go's transport leaves the body as it comes: servers that compress on the fly
	// (Harmonia) are decoded below, zstd included.
	req.Header.Set("Accept-Encoding", "zstd, gzip")
	if offset > 0 {
		req.Header.Set("Accept-Encoding", "identity")
		req.Header.Set("Range", "bytes="+strconv.FormatInt(offset, 10)+"-")
	}
	if c.auth != nil {
		c.auth(req)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, err
	}
	switch {
	case offset > 0 && resp.StatusCode == http.StatusPartialContent:
		return resp.Body, nil
	case offset > 0 && resp.StatusCode == http.StatusOK:
		resp.Body.Close()
		return nil, errNoResume
	case resp.StatusCode == http.StatusOK:
		return decodeBody(resp, u.String())
	case resp.StatusCode == http.StatusNotFound:
		resp.Body.Close()
		return nil, ErrNotFound
	case resp.StatusCode == http.StatusForbidden && c.auth == nil:
		// S3 buckets behind HTTP answer 403 for a file they do not have; Nix takes it so too.
		resp.Body.Close()
		return nil, ErrNotFound
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		resp.Body.Close()
		if c.auth == nil {
			return nil, fmt.Errorf("GET %s: %s: the cache wants credentials; give them in the plugin config's netrc_file or bearer_token", u.String(), resp.Status)
		}
		return nil, fmt.Errorf("GET %s: %s: the cache refused the credentials of the plugin config's netrc_file or bearer_token", u.String(), resp.Status)
	}
	resp.Body.Close()
	return nil, fmt.Errorf("GET %s: %s", u.String(), resp.Status)
}

// decodeBody undoes a Content-Encoding the server applied on the fly.
func decodeBody(resp *http.Response, u string) (io.ReadCloser, error) {
	switch enc := strings.ToLower(strings.TrimSpace(resp.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
		return resp.Body, nil
	case "gzip":
		zr, err := gzip.NewReader(resp.Body)
		if err != nil {
			resp.Body.Close()
			return nil, fmt.Errorf("GET %s: gzip content encoding: %w", u, err)
		}
		return readCloser{zr, func() error { zr.Close(); return resp.Body.Close() }}, nil
	case "zstd":
		zr, err := newZstdReader(resp.Body)
		if err != nil {
			resp.Body.Close()
			return nil, fmt.Errorf("GET %s: zstd content encoding: %w", u, err)
		}
		return readCloser{zr, func() error { zr.Close(); return resp.Body.Close() }}, nil
	default:
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: Content-Encoding %q is not supported (identity, gzip and zstd are)", u, enc)
	}
}

type readCloser struct {
	io.Reader
	close func() error
}

func (r readCloser) Close() error { return r.close() }

// CacheInfo is what a cache's nix-cache-info says.
type CacheInfo struct {
	Priority      int
	HasPriority   bool
	WantMassQuery bool
}

// parseCacheInfo reads nix-cache-info and refuses, with an integrityError, a cache whose StoreDir
// is not /nix/store; other errors are the reader's.
func parseCacheInfo(r io.Reader) (CacheInfo, error) {
	var info CacheInfo
	sc := bufio.NewScanner(io.LimitReader(r, 64<<10))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "StoreDir":
			if v != StoreDir {
				return info, integrityf("nix-cache-info: the cache is for store %q, not %s", v, StoreDir)
			}
		case "Priority":
			p, err := strconv.Atoi(v)
			if err != nil {
				return info, integrityf("nix-cache-info: Priority %q is not an integer", v)
			}
			info.Priority, info.HasPriority = p, true
		case "WantMassQuery":
			info.WantMassQuery = v == "1"
		}
	}
	return info, sc.Err()
}

// netrcEntry is a machine's (or the default) login and password.
type netrcEntry struct{ login, password string }

type netrc struct {
	machines map[string]netrcEntry
	def      *netrcEntry
}

// lookup finds the entry for a host name, as curl (and so Nix) does: by name, without the port.
func (n netrc) lookup(host string) (netrcEntry, bool) {
	if e, ok := n.machines[strings.ToLower(host)]; ok {
		return e, true
	}
	if n.def != nil {
		return *n.def, true
	}
	return netrcEntry{}, false
}

// parseNetrc reads the netrc format Nix's netrc-file takes: machine/default entries with login
// and password; account and macdef are skipped. Errors name the line, never a value.
func parseNetrc(text string) (netrc, error) {
	n := netrc{machines: map[string]netrcEntry{}}
	var cur *netrcEntry
	var curHost string
	flush := func() {
		if cur == nil {
			return
		}
		if curHost == "" {
			e := *cur
			n.def = &e
		} else if _, seen := n.machines[curHost]; !seen {
			// curl takes the first entry of a machine.
			n.machines[curHost] = *cur
		}
		cur = nil
	}
	lines := strings.Split(text, "\n")
	for i := 0; i < len(lines); i++ {
		fields := strings.Fields(lines[i])
		for j := 0; j < len(fields); j++ {
			value := func() (string, error) {
				if j+1 >= len(fields) {
					return "", fmt.Errorf("line %d: %q needs a value on the same line", i+1, fields[j])
				}
				j++
				return fields[j], nil
			}
			switch kw := fields[j]; kw {
			case "machine":
				flush()
				h, err := value()
				if err != nil {
					return n, err
				}
				cur, curHost = &netrcEntry{}, strings.ToLower(h)
			case "default":
				flush()
				cur, curHost = &netrcEntry{}, ""
			case "login", "password", "account":
				v, err := value()
				if err != nil {
					return n, err
				}
				if cur == nil {
					return n, fmt.Errorf("line %d: %q before any machine or default", i+1, kw)
				}
				switch kw {
				case "login":
					cur.login = v
				case "password":
					cur.password = v
				}
			case "macdef":
				// A macro runs to the next empty line.
				for i++; i < len(lines) && strings.TrimSpace(lines[i]) != ""; i++ {
				}
				j = len(fields)
			default:
				if strings.HasPrefix(kw, "#") {
					j = len(fields)
					continue
				}
				return n, fmt.Errorf("line %d: unknown netrc keyword (machine, default, login, password, account and macdef are known)", i+1)
			}
		}
	}
	flush()
	return n, nil
}

// CheckNetrc reads and parses a netrc file, for the plugin config's check.
func CheckNetrc(file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	_, err = parseNetrc(string(b))
	return err
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// DirCache is a binary cache in a directory, as `nix copy --to file://DIR` writes it.
type DirCache struct {
	name string
	root *os.Root
}

// NewDirCache uses an opened directory as a cache, and closes it with the cache.
func NewDirCache(root *os.Root, name string) (*DirCache, error) {
	if err := checkCacheInfo(root); err != nil {
		root.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return &DirCache{name: name, root: root}, nil
}

func (c *DirCache) String() string { return c.name }

func (c *DirCache) Retryable() bool { return false }

// Close releases the directory.
func (c *DirCache) Close() error { return c.root.Close() }

func (c *DirCache) Open(_ context.Context, rel string) (io.ReadCloser, error) {
	f, err := c.root.Open(rel)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s: %s is not a regular file", c.name, rel)
	}
	return f, nil
}

// checkCacheInfo refuses a cache for another store directory; nix-cache-info is optional.
func checkCacheInfo(root *os.Root) error {
	f, err := root.Open("nix-cache-info")
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = parseCacheInfo(f)
	return err
}

// fileCache is a cache directory named by a file:// URL in the plugin config, ranked by its
// parameters like any other.
type fileCache struct {
	*DirCache
	param CacheParams
}

func (c *fileCache) params() CacheParams { return c.param }

func checkFileURL(u *url.URL) error {
	p := u.Path
	if p != "/" {
		p = strings.TrimSuffix(p, "/")
	}
	switch {
	case u.Host != "" && u.Host != "localhost":
		return fmt.Errorf("names host %q: a file:// cache is a directory on this client, file:///DIR", u.Host)
	case !filepath.IsAbs(p) || filepath.Clean(p) != p:
		return errors.New("must name an absolute, clean directory path: file:///DIR")
	}
	return nil
}

func openFileCache(c CacheURL, _ CacheConfig) (Source, error) {
	root, err := os.OpenRoot(c.u.Path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", c.Identity(), err)
	}
	dc, err := NewDirCache(root, c.Identity())
	if err != nil {
		return nil, err
	}
	return &fileCache{DirCache: dc, param: c.params}, nil
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package closure

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// BenchmarkImport compares, in one run, importing a closure into the driver's own store from a
// binary cache directory, a loopback HTTP server (rclone serve http) and a loopback S3 server
// (rclone serve s3) with `nix copy --from` of the same cache (directory and HTTP: Debian's Nix has
// no S3 support) into a fresh Nix store on the same disk. Closures: the systemd fixture (a Debian /usr of about 110 MiB
// of NARs in 3 paths, zstd) and the wide fixture (1,002 small paths, zstd).
func BenchmarkImport(b *testing.B) {
	sysd, wide, dir := os.Getenv("NIXOS_NSPAWN_SYSTEMD_TOPLEVEL"), os.Getenv("NIXOS_NSPAWN_WIDE_TOPLEVEL"), os.Getenv("NIXOS_NSPAWN_CLOSURES")
	if sysd == "" || wide == "" || dir == "" {
		b.Fatal("NIXOS_NSPAWN_SYSTEMD_TOPLEVEL, NIXOS_NSPAWN_WIDE_TOPLEVEL and NIXOS_NSPAWN_CLOSURES must be set: run through `make bench`")
	}
	s3srv := startS3(b)
	b.Run("systemd", func(b *testing.B) { benchImport(b, s3srv, sysd, filepath.Join(dir, "systemd-zstd")) })
	b.Run("wide", func(b *testing.B) {
		cache := filepath.Join(b.TempDir(), "wide-zstd")
		mustOutput(b, "nix", "--extra-experimental-features", "nix-command", "copy", "--to", "file://"+cache+"?compression=zstd", wide)
		benchImport(b, s3srv, wide, cache)
	})
}

func benchImport(b *testing.B, s3srv *s3Server, top, cache string) {
	var narBytes int64
	for _, p := range strings.Fields(string(mustOutput(b, "nix-store", "-qR", top))) {
		n, err := strconv.ParseInt(strings.TrimSpace(string(mustOutput(b, "nix-store", "-q", "--size", p))), 10, 64)
		if err != nil {
			b.Fatal(err)
		}
		narBytes += n
	}
	// A static file server in a process of its own, as in production (not sharing this one's CPUs
	// and garbage collector).
	httpURL := "http://" + rclone(b, "serve", "http", cache)
	bucket := strings.ToLower(strings.NewReplacer("_", "-", "/", "-").Replace(filepath.Base(cache)))
	s3srv.upload(b, bucket, cache)

	driver := func(b *testing.B, open func() (Source, error)) {
		b.SetBytes(narBytes)
		for b.Loop() {
			s, err := NewOwnStore(filepath.Join(b.TempDir(), "store"))
			if err != nil {
				b.Fatal(err)
			}
			c, err := open()
			if err != nil {
				b.Fatal(err)
			}
			if _, err := NewImporter(s, Policy{AllowUnsigned: true}).Import(context.Background(), Request{Toplevel: top, Caches: []Source{c}}); err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	}
	byURL := func(raw string, cfg CacheConfig) func() (Source, error) {
		return func() (Source, error) {
			u, err := ParseCacheURL(raw)
			if err != nil {
				return nil, err
			}
			return OpenCache(u, cfg)
		}
	}
	b.Run("driver-dir", func(b *testing.B) {
		driver(b, func() (Source, error) { return openDirCache(cache) })
	})
	b.Run("driver-http", func(b *testing.B) { driver(b, byURL(httpURL, CacheConfig{Connections: DefaultJobs})) })
	b.Run("driver-s3", func(b *testing.B) {
		driver(b, byURL(s3srv.url(bucket), CacheConfig{AWSCredentialsFile: s3srv.credentialsFile, Connections: DefaultJobs}))
	})
	nixCopy := func(b *testing.B, from string) {
		b.SetBytes(narBytes)
		for b.Loop() {
			cmd := exec.Command("nix", "--extra-experimental-features", "nix-command", "copy", "--no-check-sigs",
				"--from", from, "--to", b.TempDir(), top)
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatalf("%v: %s", err, out)
			}
		}
	}
	b.Run("nix-copy-dir", func(b *testing.B) { nixCopy(b, "file://"+cache) })
	b.Run("nix-copy-http", func(b *testing.B) { nixCopy(b, httpURL) })
}

func mustOutput(b *testing.B, name string, args ...string) []byte {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		b.Fatalf("%s %v: %v", name, args, err)
	}
	return out
}

// BenchmarkImportPresent roots a toplevel already in the host's Nix store (the systemd fixture)
// as a task start does: "first" with an importer that has not seen it (nix-store asked what is
// missing and what its closure is), "known" with one that imported it before (only the root).
func BenchmarkImportPresent(b *testing.B) {
	sysd := os.Getenv("NIXOS_NSPAWN_SYSTEMD_TOPLEVEL")
	if sysd == "" {
		b.Fatal("NIXOS_NSPAWN_SYSTEMD_TOPLEVEL must be set: run through `make bench`")
	}
	nixStore, err := exec.LookPath("nix-store")
	if err != nil {
		b.Fatal(err)
	}
	importer := func(b *testing.B) *Importer {
		data := b.TempDir()
		s, err := NewNixStore(nixStore, filepath.Join(data, "gcroots"), filepath.Join(data, "tmp"))
		if err != nil {
			b.Fatal(err)
		}
		return NewImporter(s, Policy{})
	}
	root := func(b *testing.B, im *Importer) {
		req := Request{Toplevel: sysd, Root: "bench"}
		if _, err := im.Import(context.Background(), req); err != nil {
			b.Fatal(err)
		}
		if err := im.RemoveRoot(context.Background(), "bench"); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("first", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			im := importer(b)
			b.StartTimer()
			root(b, im)
		}
	})
	b.Run("known", func(b *testing.B) {
		im := importer(b)
		root(b, im)
		for b.Loop() {
			root(b, im)
		}
	})
}

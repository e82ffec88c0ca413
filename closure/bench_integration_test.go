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

// BenchmarkImport compares importing the systemd fixture's closure (a Debian /usr of about
// 110 MiB of NARs, zstd-compressed) from a binary cache directory into the driver's own store
// with `nix copy` of the same cache into a fresh Nix store on the same disk.
func BenchmarkImport(b *testing.B) {
	sysd, dir := os.Getenv("NIXOS_NSPAWN_SYSTEMD_TOPLEVEL"), os.Getenv("NIXOS_NSPAWN_CLOSURES")
	if sysd == "" || dir == "" {
		b.Fatal("NIXOS_NSPAWN_SYSTEMD_TOPLEVEL and NIXOS_NSPAWN_CLOSURES must be set: run through `make bench`")
	}
	cache := filepath.Join(dir, "systemd-zstd")
	var narBytes int64
	for _, p := range strings.Fields(string(mustOutput(b, "nix-store", "-qR", sysd))) {
		n, err := strconv.ParseInt(strings.TrimSpace(string(mustOutput(b, "nix-store", "-q", "--size", p))), 10, 64)
		if err != nil {
			b.Fatal(err)
		}
		narBytes += n
	}
	b.Run("driver", func(b *testing.B) {
		b.SetBytes(narBytes)
		for b.Loop() {
			s, err := NewOwnStore(filepath.Join(b.TempDir(), "store"))
			if err != nil {
				b.Fatal(err)
			}
			c, err := openDirCache(cache)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := NewImporter(s, Policy{AllowUnsigned: true}).Import(context.Background(), Request{Toplevel: sysd, Caches: []Source{c}}); err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	})
	b.Run("nix-copy", func(b *testing.B) {
		b.SetBytes(narBytes)
		for b.Loop() {
			root := b.TempDir()
			cmd := exec.Command("nix", "--extra-experimental-features", "nix-command", "copy", "--no-check-sigs",
				"--from", "file://"+cache, "--to", root, sysd)
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatalf("%v: %s", err, out)
			}
		}
	})
}

func mustOutput(b *testing.B, name string, args ...string) []byte {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		b.Fatalf("%s %v: %v", name, args, err)
	}
	return out
}

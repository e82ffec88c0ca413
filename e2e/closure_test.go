// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"archive/tar"
	"archive/zip"
	"compress/gzip"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/shoenig/test/must"
	"github.com/ulikunitz/xz"
)

// Closures delivered as Nomad artifacts: a signed binary cache archived in each format Nomad's
// artifact fetcher unpacks, served over HTTP from the build machine (the test host shares its
// network), and an export stream, which the README's plugin config refuses as unsigned.

func closures(t *testing.T) string { return env(t, "NIXOS_NSPAWN_CLOSURES") }

// archive writes the directory src as an archive of the given format.
func archive(t *testing.T, src, dst, format string) {
	f, err := os.Create(dst)
	must.NoError(t, err)
	defer f.Close()
	if format == "zip" {
		zw := zip.NewWriter(f)
		must.NoError(t, zw.AddFS(os.DirFS(src)))
		must.NoError(t, zw.Close())
		return
	}
	var w io.WriteCloser
	switch format {
	case "tar.gz":
		w = gzip.NewWriter(f)
	case "tar.xz":
		w, err = xz.NewWriter(f)
		must.NoError(t, err)
	case "tar.zst":
		w, err = zstd.NewWriter(f)
		must.NoError(t, err)
	}
	tw := tar.NewWriter(w)
	must.NoError(t, tw.AddFS(os.DirFS(src)))
	must.NoError(t, tw.Close())
	must.NoError(t, w.Close())
}

// serve serves dir over HTTP on the build machine's loopback.
func serve(t *testing.T, dir string) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must.NoError(t, err)
	srv := &http.Server{Handler: http.FileServer(http.Dir(dir))}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return "http://" + l.Addr().String()
}

func TestClosureArtifacts(t *testing.T) {
	cachedB, err := os.ReadFile(filepath.Join(closures(t), "cached.toplevel"))
	must.NoError(t, err)
	cached := strings.TrimSpace(string(cachedB))
	deleteCached := func() {
		// Nomad destroys a finished task, and with it the machine's GC root, a moment later.
		waitOutput(t, time.Minute, "deleted", func() string {
			host(t, "sh", "-c", "nix-store --delete "+cached+" >/dev/null 2>&1 || true")
			if strings.Contains(host(t, "sh", "-c", "nix-store --check-validity "+cached+" 2>/dev/null && echo valid || true"), "valid") {
				return "still valid"
			}
			return "deleted"
		})
	}
	deleteCached()
	t.Cleanup(deleteCached)

	dir := t.TempDir()
	formats := []string{"tar.zst", "tar.gz", "tar.xz", "zip"}
	for _, format := range formats {
		archive(t, filepath.Join(closures(t), "cached-xz"), filepath.Join(dir, "cached."+format), format)
	}
	must.NoError(t, os.Link(filepath.Join(closures(t), "cached.export"), filepath.Join(dir, "cached.export")))
	whole, err := os.ReadFile(filepath.Join(dir, "cached.tar.gz"))
	must.NoError(t, err)
	must.NoError(t, os.WriteFile(filepath.Join(dir, "truncated.tar.gz"), whole[:len(whole)/2], 0o644))
	base := serve(t, dir)

	for i, format := range formats {
		t.Run(format, func(t *testing.T) {
			id := "e2e-closure-" + strings.ReplaceAll(format, ".", "-")
			runJob(t, id, "closure.nomad.hcl", map[string]any{"toplevel": cached, "source": base + "/cached." + format})
			a := waitAlloc(t, id, 2*time.Minute, "completion", func(a allocation) bool { return a.ClientStatus == "complete" || a.ClientStatus == "failed" })
			ts := a.TaskStates["t"]
			must.EqOp(t, "complete", a.ClientStatus, must.Sprint(pretty(ts.Events)))
			// The first allocation fetched the closure into the host's store; the others share it.
			if i == 0 {
				must.True(t, hasEvent(ts, "Driver", "closure fetched into the host store: 1 paths"), must.Sprint(pretty(ts.Events)))
				must.True(t, hasEvent(ts, "Driver", "signature verified by nomad-driver-nixos-fixture-1"), must.Sprint(pretty(ts.Events)))
			} else {
				must.False(t, hasEvent(ts, "Driver", "closure fetched"), must.Sprint(pretty(ts.Events)))
			}
			must.StrContains(t, nomad(t, "alloc", "logs", a.ID, "t"), "tinyinit: store 2 ")
		})
	}

	t.Run("truncated archive", func(t *testing.T) {
		id := "e2e-closure-truncated"
		runJob(t, id, "closure.nomad.hcl", map[string]any{"toplevel": cached, "source": base + "/truncated.tar.gz"})
		a := waitAlloc(t, id, 2*time.Minute, "failure", func(a allocation) bool { return a.ClientStatus == "failed" })
		ts := a.TaskStates["t"]
		// Nomad's artifact fetcher refuses it; the driver is never asked.
		must.True(t, hasEvent(ts, "Failed Artifact Download", ""), must.Sprint(pretty(ts.Events)))
		must.False(t, hasEvent(ts, "Driver", ""), must.Sprint(pretty(ts.Events)))
	})

	t.Run("export stream refused as unsigned", func(t *testing.T) {
		id := "e2e-closure-export"
		runJob(t, id, "closure-export.nomad.hcl", map[string]any{"toplevel": cached, "source": base + "/cached.export"})
		a := waitAlloc(t, id, 2*time.Minute, "failure", func(a allocation) bool { return a.ClientStatus == "failed" })
		must.StrContains(t, nomad(t, "alloc", "status", a.ID), "export streams carry no signatures")
	})
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"bufio"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// Closures from the binary caches operators run, through the agent: an S3 bucket (rclone's
// `serve s3`, which checks SigV4), a cache that wants a bearer token, and a cache that is down
// ranked before the others. e2e/agent/agent.sh lists them in the plugin config as
// trusted_substituters, at these addresses, with the credentials it made in build/e2e-caches.
const (
	s3Cache    = "s3://e2e-closure?endpoint=127.0.0.1:4680&scheme=http&profile=e2e"
	s3Addr     = "127.0.0.1:4680"
	tokenCache = "http://127.0.0.1:4681/ci"
	tokenAddr  = "127.0.0.1:4681"
	downCache  = "http://127.0.0.1:4682/down"
)

// e2eSecret reads a credential agent.sh made for this agent.
func e2eSecret(t *testing.T, name string) string {
	b, err := os.ReadFile(filepath.Join(repoRoot, "build", "e2e-caches", name))
	must.NoError(t, err, must.Sprint("e2e/agent/agent.sh up makes it"))
	return strings.TrimSpace(string(b))
}

// awsKeys reads the key pair of the e2e profile.
func awsKeys(t *testing.T) (id, secret string) {
	sc := bufio.NewScanner(strings.NewReader(e2eSecret(t, "aws-credentials")))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		switch k = strings.TrimSpace(k); {
		case ok && k == "aws_access_key_id":
			id = strings.TrimSpace(v)
		case ok && k == "aws_secret_access_key":
			secret = strings.TrimSpace(v)
		}
	}
	must.True(t, id != "" && secret != "", must.Sprint("the e2e profile has both keys"))
	return id, secret
}

// serveS3 serves the bucket e2e-closure, a copy of a fixture cache, with the agent's keys.
func serveS3(t *testing.T, fixture string) {
	id, secret := awsKeys(t)
	dir := t.TempDir()
	must.NoError(t, os.Mkdir(filepath.Join(dir, "buckets"), 0o755))
	out, err := exec.Command("cp", "-a", filepath.Join(closures(t), fixture), filepath.Join(dir, "buckets", "e2e-closure")).CombinedOutput()
	must.NoError(t, err, must.Sprint(string(out)))
	must.NoError(t, os.WriteFile(filepath.Join(dir, "rclone.conf"), nil, 0o600))
	cmd := exec.Command(env(t, "NIXOS_NSPAWN_RCLONE"), "serve", "s3", "--config", filepath.Join(dir, "rclone.conf"),
		"--addr", s3Addr, "--auth-key", id+","+secret, filepath.Join(dir, "buckets"))
	must.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	must.Wait(t, wait.InitialSuccess(wait.ErrorFunc(func() error {
		c, err := net.Dial("tcp", s3Addr)
		if err == nil {
			c.Close()
		}
		return err
	}), wait.Timeout(30*time.Second), wait.Gap(100*time.Millisecond)))
}

// serveTokenCache serves a fixture cache under /ci to requests that bear the token *want holds.
func serveTokenCache(t *testing.T, fixture string, want *atomic.Value) {
	files := http.StripPrefix("/ci", http.FileServer(http.Dir(filepath.Join(closures(t), fixture))))
	l, err := net.Listen("tcp", tokenAddr)
	must.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+want.Load().(string) {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		files.ServeHTTP(w, r)
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
}

// deleteFromHostStore removes a closure the host's store has from an earlier test or run; Nomad
// destroys a finished task, and with it the machine's GC root, a moment after it ends.
func deleteFromHostStore(t *testing.T, p string) {
	waitOutput(t, time.Minute, "deleted", func() string {
		host(t, "sh", "-c", "nix-store --delete "+p+" >/dev/null 2>&1 || true")
		if strings.Contains(host(t, "sh", "-c", "nix-store --check-validity "+p+" 2>/dev/null && echo valid || true"), "valid") {
			return "still valid"
		}
		return "deleted"
	})
}

func TestClosureFromCaches(t *testing.T) {
	cachedB, err := os.ReadFile(filepath.Join(closures(t), "cached.toplevel"))
	must.NoError(t, err)
	cached := strings.TrimSpace(string(cachedB))
	token := e2eSecret(t, "token")
	_, awsSecret := awsKeys(t)
	serveS3(t, "cached-xz")
	var want atomic.Value
	want.Store(token)
	serveTokenCache(t, "cached-xz", &want)
	t.Cleanup(func() { deleteFromHostStore(t, cached) })

	boots := func(t *testing.T, id string, substituters []string) taskState {
		deleteFromHostStore(t, cached)
		runJob(t, id, "closure-substituters.nomad.hcl", map[string]any{"toplevel": cached, "substituters": substituters})
		a := waitAlloc(t, id, 2*time.Minute, "completion", func(a allocation) bool { return a.ClientStatus == "complete" || a.ClientStatus == "failed" })
		ts := a.TaskStates["t"]
		must.EqOp(t, "complete", a.ClientStatus, must.Sprint(pretty(ts.Events)))
		must.True(t, hasEvent(ts, "Driver", "closure fetched into the host store: 1 paths"), must.Sprint(pretty(ts.Events)))
		must.True(t, hasEvent(ts, "Driver", "signature verified by nomad-driver-nixos-fixture-1"), must.Sprint(pretty(ts.Events)))
		must.StrContains(t, nomad(t, "alloc", "logs", a.ID, "t"), "tinyinit: store 2 ")
		return ts
	}

	t.Run("S3 bucket", func(t *testing.T) {
		boots(t, "e2e-caches-s3", []string{s3Cache})
	})
	t.Run("a down cache ranked first is skipped with an event", func(t *testing.T) {
		ts := boots(t, "e2e-caches-down", []string{downCache, s3Cache})
		must.True(t, hasEvent(ts, "Driver", "binary cache "+downCache+"?priority=1 skipped: "), must.Sprint(pretty(ts.Events)))
	})
	t.Run("token cache", func(t *testing.T) {
		boots(t, "e2e-caches-token", []string{tokenCache})
	})
	t.Run("token refused: the error names the cache and the status, not the token", func(t *testing.T) {
		want.Store("a-token-the-agent-does-not-have")
		t.Cleanup(func() { want.Store(token) })
		deleteFromHostStore(t, cached)
		id := "e2e-caches-refused"
		runJob(t, id, "closure-substituters.nomad.hcl", map[string]any{"toplevel": cached, "substituters": []string{tokenCache}})
		a := waitAlloc(t, id, 2*time.Minute, "failure", func(a allocation) bool { return a.ClientStatus == "failed" })
		status := nomad(t, "alloc", "status", a.ID)
		must.StrContains(t, status, tokenCache+"/nix-cache-info: 401 Unauthorized")
		must.StrContains(t, status, "is in none of the binary caches")
		must.StrNotContains(t, status, token)
	})
	t.Run("no credential in the agent's log", func(t *testing.T) {
		logs := host(t, "journalctl", "-u", "nomad-e2e-agent", "--no-pager", "-o", "cat")
		must.StrNotContains(t, logs, token)
		must.StrNotContains(t, logs, awsSecret)
	})
}

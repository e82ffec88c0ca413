// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build integration

package closure

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/klauspost/compress/zstd"
	"github.com/shoenig/test/must"
)

// s3Server is rclone's `serve s3` (a real S3 server that checks SigV4 signatures) on loopback,
// serving buckets from a fresh directory.
type s3Server struct {
	endpoint          string
	keyID, secret     string
	credentialsFile   string
	uploadedBytes     int64
	uploadedFileCount int
}

// rclone runs the rclone that e2e/tools/rclone.sh built (NIXOS_NSPAWN_RCLONE) with args and
// --addr on a free loopback port until the test ends, and returns the address.
func rclone(t testing.TB, args ...string) string {
	bin := os.Getenv("NIXOS_NSPAWN_RCLONE")
	if bin == "" {
		t.Fatal("NIXOS_NSPAWN_RCLONE is not set: it names the rclone that e2e/tools/rclone.sh builds; run through `make test`")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	empty := filepath.Join(t.TempDir(), "rclone.conf")
	must.NoError(t, os.WriteFile(empty, nil, 0o600))
	var logs bytes.Buffer
	cmd := exec.Command(bin, append([]string{"--config", empty, "--addr", addr}, args...)...)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	must.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("rclone %v:\n%s", args, logs.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("rclone %v did not listen on %s: %s", args, addr, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startS3 runs rclone's `serve s3`, serving buckets from a fresh directory.
func startS3(t testing.TB) *s3Server {
	// Keep the AWS SDK to this test's credentials file: no environment keys, no instance metadata.
	for _, k := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"} {
		t.Setenv(k, "")
	}
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "no-config"))
	srv := &s3Server{keyID: "NXCLTESTKEY", secret: "nxcl-s3-secret-5d2e81"}
	root := filepath.Join(t.TempDir(), "buckets")
	must.NoError(t, os.Mkdir(root, 0o755))
	srv.endpoint = rclone(t, "serve", "s3", "--auth-key", srv.keyID+","+srv.secret, root)
	// A non-default profile, so the URL's profile= is what picks it.
	srv.credentialsFile = filepath.Join(t.TempDir(), "credentials")
	must.NoError(t, os.WriteFile(srv.credentialsFile, []byte(fmt.Sprintf("[default]\naws_access_key_id = WRONG\naws_secret_access_key = wrong\n\n[nxcl]\naws_access_key_id = %s\naws_secret_access_key = %s\n", srv.keyID, srv.secret)), 0o600))
	return srv
}

// url is the substituter URL of a bucket, as an operator writes it for an S3-compatible server.
func (s *s3Server) url(bucket string, extra ...string) string {
	return "s3://" + bucket + "?" + strings.Join(append([]string{"endpoint=" + s.endpoint, "scheme=http", "region=us-east-1", "profile=nxcl"}, extra...), "&")
}

// upload creates a bucket holding a cache directory, through the S3 API as `nix copy --to s3://`
// would (Debian's Nix has no S3 support). skip leaves files out.
func (s *s3Server) upload(t testing.TB, bucket, dir string, skip ...string) {
	client := s3.New(s3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String("http://" + s.endpoint),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(s.keyID, s.secret, ""),
	})
	ctx := context.Background()
	_, err := client.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(bucket)})
	must.NoError(t, err)
	must.NoError(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		for _, s := range skip {
			if rel == s {
				return nil
			}
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		_, err = client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(filepath.ToSlash(rel)), Body: bytes.NewReader(b)})
		s.uploadedBytes += int64(len(b))
		s.uploadedFileCount++
		return err
	}))
}

func openURLWith(t *testing.T, raw string, cfg CacheConfig) Source {
	u, err := ParseCacheURL(raw)
	must.NoError(t, err)
	c, err := OpenCache(u, cfg)
	must.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// events collects what an import tells the operator.
type events struct {
	mu   sync.Mutex
	list []string
}

func (e *events) add(s string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.list = append(e.list, s)
}

func (e *events) all() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.list...)
}

func TestImportS3Cache(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	srv := startS3(t)
	srv.upload(t, "tiny", filepath.Join(closures(t), "tiny-xz"))
	cfg := CacheConfig{AWSCredentialsFile: srv.credentialsFile, Connections: 4}

	t.Run("boots from the bucket", func(t *testing.T) {
		s := ownStore(t)
		var ev events
		cache := openURLWith(t, srv.url("tiny"), cfg)
		res, err := NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{
			Toplevel: tiny, Caches: []Source{cache}, Root: "a", Event: ev.add,
		})
		must.NoError(t, err)
		must.Eq(t, requisites(t, tiny), res.Requisites)
		must.Eq(t, []string{"nomad-driver-nixos-fixture-1"}, res.SignedBy)
		must.SliceEmpty(t, ev.all())
		must.NoError(t, CheckToplevel(s.Dir(), tiny))
		// Close can end the connections: it holds the transport the SDK built.
		s3c := cache.(*S3Cache)
		s3c.mu.Lock()
		must.NotNil(t, s3c.transport)
		s3c.mu.Unlock()
	})

	t.Run("wrong secret: the error names the cache and the status, not the secret", func(t *testing.T) {
		bad := filepath.Join(t.TempDir(), "credentials")
		wrong := "definitely-not-the-secret-77"
		must.NoError(t, os.WriteFile(bad, []byte("[nxcl]\naws_access_key_id = "+srv.keyID+"\naws_secret_access_key = "+wrong+"\n"), 0o600))
		s := ownStore(t)
		var ev events
		_, err := NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{
			Toplevel: tiny, Caches: []Source{openURLWith(t, srv.url("tiny"), CacheConfig{AWSCredentialsFile: bad})}, Root: "a", Event: ev.add,
		})
		must.ErrorContains(t, err, "s3://tiny?endpoint=")
		must.ErrorContains(t, err, "StatusCode: 403")
		must.ErrorContains(t, err, "could not be used")
		for _, msg := range append(ev.all(), err.Error()) {
			must.StrNotContains(t, msg, wrong)
			must.StrNotContains(t, msg, srv.secret)
		}
		must.Len(t, 1, ev.all())
		must.StrContains(t, ev.all()[0], "binary cache s3://tiny?endpoint=")
		assertEmpty(t, s)
	})

	t.Run("a bucket without the path", func(t *testing.T) {
		srv.upload(t, "partial", filepath.Join(closures(t), "tiny-xz"), hashPart(tiny)+".narinfo")
		_, err := NewImporter(ownStore(t), fixturePolicy(t)).Import(context.Background(), Request{
			Toplevel: tiny, Caches: []Source{openURLWith(t, srv.url("partial"), cfg)},
		})
		must.ErrorContains(t, err, "store path "+tiny+" is in none of the binary caches (s3://partial?endpoint=")
	})

	t.Run("resumes a dropped NAR", func(t *testing.T) {
		// A proxy in front of the S3 server cuts the first NAR response half way.
		var cut sync.Once
		var ranges []string
		var mu sync.Mutex
		proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Range") != "" {
				mu.Lock()
				ranges = append(ranges, r.Header.Get("Range"))
				mu.Unlock()
			}
			req, _ := http.NewRequest(r.Method, "http://"+srv.endpoint+r.URL.RequestURI(), r.Body)
			req.Header = r.Header.Clone()
			req.Host = r.Host
			resp, err := http.DefaultTransport.RoundTrip(req)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			defer resp.Body.Close()
			for k, v := range resp.Header {
				w.Header()[k] = v
			}
			w.WriteHeader(resp.StatusCode)
			if strings.Contains(r.URL.Path, "/nar/") && r.Header.Get("Range") == "" {
				dropped := false
				cut.Do(func() {
					dropped = true
					_, _ = io.CopyN(w, resp.Body, resp.ContentLength/2)
					w.(http.Flusher).Flush()
					conn, _, _ := w.(http.Hijacker).Hijack()
					conn.(*net.TCPConn).SetLinger(0)
					conn.Close()
				})
				if dropped {
					return
				}
			}
			_, _ = io.Copy(w, resp.Body)
		}))
		t.Cleanup(proxy.Close)
		url := strings.Replace(srv.url("tiny"), srv.endpoint, strings.TrimPrefix(proxy.URL, "http://"), 1)
		res, err := NewImporter(ownStore(t), fixturePolicy(t)).Import(context.Background(), Request{
			Toplevel: tiny, Caches: []Source{openURLWith(t, url, cfg)},
		})
		must.NoError(t, err)
		must.Eq(t, 1, res.Resumed)
		must.Len(t, 1, ranges)
		must.StrHasPrefix(t, "bytes=", ranges[0])
	})
}

// tokenServer serves a cache directory only to requests with the token, as Attic and Cachix do:
// as a bearer token or as the password of basic authentication (what a netrc entry sends).
func tokenServer(t *testing.T, dir, token string) *httptest.Server {
	files := http.FileServer(http.Dir(dir))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, pass, basic := r.BasicAuth()
		if r.Header.Get("Authorization") != "Bearer "+token && !(basic && pass == token) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="cache"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		files.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestImportTokenCache(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	token := "eyJhbGciOiJIUzI1NiJ9.nxcl-attic-token"
	srv := tokenServer(t, filepath.Join(closures(t), "tiny-zstd"), token)
	u, err := ParseCacheURL(srv.URL + "/ci")
	must.NoError(t, err)
	host := strings.Split(strings.TrimPrefix(srv.URL, "http://"), ":")[0]
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		must.NoError(t, os.WriteFile(p, []byte(content), 0o600))
		return p
	}
	// The server serves the cache at its root; the URL's path is the cache's name, as with Attic.
	srv.Config.Handler = http.StripPrefix("/ci", srv.Config.Handler)

	for name, cfg := range map[string]CacheConfig{
		"bearer token file": {BearerTokenFiles: map[string]string{u.Identity(): write("token", token+"\n")}},
		"netrc file":        {NetrcFile: write("netrc", "machine "+host+" login nomad password "+token+"\n")},
	} {
		t.Run("right token: "+name, func(t *testing.T) {
			res, err := NewImporter(ownStore(t), fixturePolicy(t)).Import(context.Background(), Request{
				Toplevel: tiny, Caches: []Source{openURLWith(t, u.Raw(), cfg)},
			})
			must.NoError(t, err)
			must.Eq(t, requisites(t, tiny), res.Requisites)
		})
	}
	wrong := "eyJhbGciOiJIUzI1NiJ9.revoked-token"
	for name, c := range map[string]struct {
		cfg  CacheConfig
		want string
	}{
		"wrong bearer token":   {CacheConfig{BearerTokenFiles: map[string]string{u.Identity(): write("wrong", wrong)}}, "401 Unauthorized: the cache refused the credentials"},
		"wrong netrc password": {CacheConfig{NetrcFile: write("wrong-netrc", "machine "+host+" login nomad password "+wrong+"\n")}, "401 Unauthorized: the cache refused the credentials"},
		"no token":             {CacheConfig{}, "401 Unauthorized: the cache wants credentials"},
	} {
		t.Run(name, func(t *testing.T) {
			s := ownStore(t)
			var ev events
			_, err := NewImporter(s, fixturePolicy(t)).Import(context.Background(), Request{
				Toplevel: tiny, Caches: []Source{openURLWith(t, u.Raw(), c.cfg)}, Event: ev.add,
			})
			must.ErrorContains(t, err, srv.URL+"/ci/nix-cache-info: "+c.want)
			for _, msg := range append(ev.all(), err.Error()) {
				must.StrNotContains(t, msg, token)
				must.StrNotContains(t, msg, wrong)
				must.StrNotContains(t, msg, "nxcl-attic")
			}
			assertEmpty(t, s)
		})
	}
}

// loggingServer serves a cache directory and records the paths asked for, in order.
type loggingServer struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []string
}

func newLoggingServer(t *testing.T, dir string) *loggingServer {
	ls := &loggingServer{}
	files := http.FileServer(http.Dir(dir))
	ls.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ls.mu.Lock()
		ls.reqs = append(ls.reqs, r.URL.Path)
		ls.mu.Unlock()
		files.ServeHTTP(w, r)
	}))
	t.Cleanup(ls.Close)
	return ls
}

// asked lists the requests whose path contains part.
func (ls *loggingServer) asked(part string) []string {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	var out []string
	for _, r := range ls.reqs {
		if strings.Contains(r, part) {
			out = append(out, r)
		}
	}
	return out
}

func TestImportCachePriorities(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	reqs := requisites(t, tiny)
	must.Len(t, 2, reqs)
	// official: everything, Priority 40 in its nix-cache-info, as cache.nixos.org.
	official := copyCache(t, "tiny-xz")
	must.NoError(t, os.WriteFile(filepath.Join(official, "nix-cache-info"), []byte("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"), 0o644))
	// team: priority=10 in its URL, but without the toplevel.
	team := copyCache(t, "tiny-zstd")
	must.NoError(t, os.Remove(narinfoPath(team, tiny)))
	officialSrv, teamSrv := newLoggingServer(t, official), newLoggingServer(t, team)
	// down: priority=5, nothing listens.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must.NoError(t, err)
	down := "http://" + l.Addr().String()
	l.Close()

	var ev events
	caches := []Source{
		openURL(t, officialSrv.URL),
		openURL(t, teamSrv.URL+"?priority=10"),
		openURL(t, down+"?priority=5"),
	}
	res, err := NewImporter(ownStore(t), fixturePolicy(t)).Import(context.Background(), Request{
		Toplevel: tiny, Caches: caches, Event: ev.add, Progress: func(Progress) {},
	})
	must.NoError(t, err)
	must.Eq(t, reqs, res.Requisites)
	// The down cache is skipped with one event, not a failed import.
	must.Len(t, 1, ev.all())
	must.StrContains(t, ev.all()[0], "binary cache "+down+"?priority=5 skipped: ")
	must.StrContains(t, ev.all()[0], "connection refused")
	// team, ranked first, answered 404 for the toplevel, which came from official; the other
	// path came from team, so official was never asked for it.
	other := reqs[0]
	if other == tiny {
		other = reqs[1]
	}
	must.Eq(t, []string{"/" + hashPart(tiny) + ".narinfo", "/" + hashPart(other) + ".narinfo"}, teamSrv.asked(".narinfo"))
	must.Eq(t, []string{"/" + hashPart(tiny) + ".narinfo"}, officialSrv.asked(".narinfo"))
	must.Len(t, 1, teamSrv.asked("/nar/"))
	must.Len(t, 1, officialSrv.asked("/nar/"))

	t.Run("a file:// cache after an HTTP one", func(t *testing.T) {
		before := len(teamSrv.asked(".narinfo"))
		res, err := NewImporter(ownStore(t), fixturePolicy(t)).Import(context.Background(), Request{
			Toplevel: tiny, Caches: []Source{openURL(t, "file://"+filepath.Join(closures(t), "tiny-xz")+"?priority=20"), openURL(t, teamSrv.URL+"?priority=10")},
		})
		must.NoError(t, err)
		must.Eq(t, reqs, res.Requisites)
		// team, ranked first, was asked for both paths and had one.
		must.Len(t, before+2, teamSrv.asked(".narinfo"))
	})
	t.Run("no cache that answers has the path", func(t *testing.T) {
		_, err := NewImporter(ownStore(t), fixturePolicy(t)).Import(context.Background(), Request{
			Toplevel: tiny, Caches: []Source{openURL(t, teamSrv.URL), openURL(t, down)},
		})
		must.ErrorContains(t, err, "store path "+tiny+" is in none of the binary caches ("+teamSrv.URL+"); "+down+" could not be used: ")
	})
}

// encodingServer serves a cache directory compressing on the fly with the encoding the client
// accepts, as Harmonia does.
func encodingServer(t *testing.T, dir, encoding string) (*httptest.Server, *int) {
	var encoded int
	var mu sync.Mutex
	files := http.FileServer(http.Dir(dir))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := httptest.NewRecorder()
		files.ServeHTTP(rec, r)
		if rec.Code != http.StatusOK || !strings.Contains(r.Header.Get("Accept-Encoding"), encoding) && encoding != "br" {
			w.WriteHeader(rec.Code)
			_, _ = w.Write(rec.Body.Bytes())
			return
		}
		var buf bytes.Buffer
		switch encoding {
		case "gzip":
			zw := gzip.NewWriter(&buf)
			_, _ = zw.Write(rec.Body.Bytes())
			zw.Close()
		case "zstd":
			zw, _ := zstd.NewWriter(&buf)
			_, _ = zw.Write(rec.Body.Bytes())
			zw.Close()
		default:
			buf.Write(rec.Body.Bytes())
		}
		mu.Lock()
		encoded++
		mu.Unlock()
		w.Header().Set("Content-Encoding", encoding)
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(buf.Bytes())
	}))
	t.Cleanup(srv.Close)
	return srv, &encoded
}

func TestImportContentEncoding(t *testing.T) {
	tiny := env(t, "NIXOS_NSPAWN_TINY_TOPLEVEL")
	for _, enc := range []string{"zstd", "gzip"} {
		t.Run(enc, func(t *testing.T) {
			srv, encoded := encodingServer(t, filepath.Join(closures(t), "tiny-none"), enc)
			res, err := NewImporter(ownStore(t), fixturePolicy(t)).Import(context.Background(), Request{
				Toplevel: tiny, Caches: []Source{openURL(t, srv.URL)},
			})
			must.NoError(t, err)
			must.Eq(t, requisites(t, tiny), res.Requisites)
			// nix-cache-info, two narinfos and two NARs.
			must.Eq(t, 5, *encoded)
		})
	}
	t.Run("unknown encoding", func(t *testing.T) {
		srv, _ := encodingServer(t, filepath.Join(closures(t), "tiny-none"), "br")
		_, err := NewImporter(ownStore(t), fixturePolicy(t)).Import(context.Background(), Request{
			Toplevel: tiny, Caches: []Source{openURL(t, srv.URL)},
		})
		must.ErrorContains(t, err, `Content-Encoding "br" is not supported (identity, gzip and zstd are)`)
	})
}

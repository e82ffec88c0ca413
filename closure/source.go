// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"bufio"
	"bytes"
	"compress/bzip2"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"path"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"
	"github.com/ulikunitz/xz"
)

// maxNarInfoSize bounds a narinfo file; real ones are well under a kilobyte plus references.
const maxNarInfoSize = 4 << 20

// integrityError is a verification failure: retrying cannot fix it.
type integrityError struct{ error }

func (e integrityError) Unwrap() error { return e.error }

func integrityf(format string, args ...any) error {
	return integrityError{fmt.Errorf(format, args...)}
}

// fetchNarInfo reads and checks the narinfo of p from src; it returns ErrNotFound if src lacks p.
func fetchNarInfo(ctx context.Context, src Source, p string) (*narinfo.NarInfo, error) {
	rc, err := src.Open(ctx, hashPart(p)+".narinfo")
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	ni, err := narinfo.Parse(io.LimitReader(rc, maxNarInfoSize))
	if err != nil {
		return nil, integrityf("narinfo of %s in %s: %w", p, src, err)
	}
	if err := ni.Check(); err != nil {
		return nil, integrityf("narinfo of %s in %s: %w", p, src, err)
	}
	if ni.StorePath != p {
		return nil, integrityf("narinfo of %s in %s describes another path, %s", p, src, ni.StorePath)
	}
	if ni.NarHash == nil || ni.NarHash.Algo() != nixhash.SHA256 || ni.NarSize == 0 {
		return nil, integrityf("narinfo of %s in %s has no SHA-256 NarHash and NarSize", p, src)
	}
	if ni.FileHash != nil && ni.FileHash.Algo() != nixhash.SHA256 {
		return nil, integrityf("narinfo of %s in %s: FileHash must be SHA-256, not %s", p, src, ni.FileHash.Algo())
	}
	if err := checkNarURL(ni.URL); err != nil {
		return nil, integrityf("narinfo of %s in %s: URL %q %w", p, src, ni.URL, err)
	}
	if !compressions[ni.Compression] {
		return nil, integrityf("narinfo of %s in %s: compression %q is not supported (none, xz, zstd and bzip2 are)", p, src, ni.Compression)
	}
	return ni, nil
}

// checkNarURL keeps a narinfo's URL inside its cache: relative, clean, no scheme or query.
func checkNarURL(u string) error {
	switch {
	case u == "":
		return errors.New("is empty")
	case strings.Contains(u, "://") || strings.HasPrefix(u, "/"):
		return errors.New("points outside the cache: it must be a path relative to the cache")
	case strings.ContainsAny(u, "?#\\\x00") || path.Clean(u) != u || u == ".." || strings.HasPrefix(u, "../"):
		return errors.New("points outside the cache: it must be a clean relative path without '..', '?' or '#'")
	}
	return nil
}

var compressions = map[string]bool{"": true, "none": true, "xz": true, "zstd": true, "bzip2": true}

// decompressor wraps r for a narinfo Compression value that compressions lists.
func decompressor(compression string, r io.Reader) (io.ReadCloser, error) {
	switch compression {
	case "", "none":
		return io.NopCloser(r), nil
	case "xz":
		xr, err := xz.NewReader(r)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(xr), nil
	case "zstd":
		return newZstdReader(r)
	case "bzip2":
		return io.NopCloser(bzip2.NewReader(r)), nil
	}
	return nil, fmt.Errorf("compression %q is not supported", compression)
}

// zstdDecoders keeps decoders for reuse: a new one allocates its buffers, which for a closure of
// many small paths costs more than the decoding.
var zstdDecoders sync.Pool

// newZstdReader decodes r in the reading goroutine; Close gives the decoder back.
func newZstdReader(r io.Reader) (io.ReadCloser, error) {
	d, _ := zstdDecoders.Get().(*zstd.Decoder)
	if d == nil {
		var err error
		if d, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1)); err != nil {
			return nil, err
		}
	}
	if err := d.Reset(r); err != nil {
		d.Close()
		return nil, err
	}
	var once sync.Once
	return readCloser{d, func() error {
		once.Do(func() {
			_ = d.Reset(nil)
			zstdDecoders.Put(d)
		})
		return nil
	}}, nil
}

// hashReader hashes and counts what is read through it.
type hashReader struct {
	r      io.Reader
	h      hash.Hash
	n      uint64
	onRead func(int)
}

func newHashReader(r io.Reader, onRead func(int)) *hashReader {
	return &hashReader{r: r, h: sha256.New(), onRead: onRead}
}

func (hr *hashReader) Read(p []byte) (int, error) {
	n, err := hr.r.Read(p)
	hr.h.Write(p[:n])
	hr.n += uint64(n)
	if hr.onRead != nil && n > 0 {
		hr.onRead(n)
	}
	return n, err
}

// matches compares the hash so far with want.
func (hr *hashReader) matches(want *nixhash.HashWithEncoding) bool {
	return bytes.Equal(hr.h.Sum(nil), want.Digest())
}

// narStream is a NAR being fetched from a cache: read the NAR from nar, then call verify.
type narStream struct {
	nar    *hashReader
	file   *hashReader
	dec    io.ReadCloser
	body   io.ReadCloser
	resume *resumingReader
	source string
}

func (s *narStream) resumed() int {
	if s.resume == nil {
		return 0
	}
	return s.resume.resumed
}

// resumingReader continues a file whose connection dropped from where it broke off, so that a
// large NAR is not fetched again from its start. Hashes and sizes are checked above it.
type resumingReader struct {
	ctx     context.Context
	src     resumer
	rel     string
	rc      io.ReadCloser
	off     int64
	resumed int
}

func (r *resumingReader) Read(p []byte) (int, error) {
	for {
		n, err := r.rc.Read(p)
		r.off += int64(n)
		if err == nil || errors.Is(err, io.EOF) || r.ctx.Err() != nil || r.resumed == resumeAttempts {
			return n, err
		}
		next, rerr := r.src.OpenFrom(r.ctx, r.rel, r.off)
		if rerr != nil {
			return n, err
		}
		r.rc.Close()
		r.rc = next
		r.resumed++
		if n > 0 {
			return n, nil
		}
	}
}

func (r *resumingReader) Close() error { return r.rc.Close() }

// openNAR starts fetching the NAR ni points to. onRead is told about every compressed byte.
func openNAR(ctx context.Context, src Source, ni *narinfo.NarInfo, onRead func(int)) (*narStream, error) {
	body, err := src.Open(ctx, ni.URL)
	if errors.Is(err, ErrNotFound) {
		return nil, integrityf("NAR of %s: %s has no %s", ni.StorePath, src, ni.URL)
	}
	if err != nil {
		return nil, err
	}
	s := &narStream{body: body, source: src.String()}
	if rs, ok := src.(resumer); ok {
		s.resume = &resumingReader{ctx: ctx, src: rs, rel: ni.URL, rc: body}
		s.body = s.resume
		body = s.resume
	}
	// A small NAR (most paths of a closure) needs no large read buffer.
	bufSize := 256 << 10
	if ni.FileSize > 0 && ni.FileSize < uint64(bufSize) {
		bufSize = max(int(ni.FileSize)+1, 4096)
	}
	var fileR io.Reader = bufio.NewReaderSize(body, bufSize)
	if ni.FileSize > 0 {
		fileR = io.LimitReader(fileR, int64(ni.FileSize)+1)
	}
	s.file = newHashReader(fileR, onRead)
	if s.dec, err = decompressor(ni.Compression, s.file); err != nil {
		body.Close()
		return nil, integrityf("NAR of %s from %s: %w", ni.StorePath, src, err)
	}
	s.nar = newHashReader(io.LimitReader(s.dec, int64(ni.NarSize)+1), nil)
	return s, nil
}

func (s *narStream) Read(p []byte) (int, error) { return s.nar.Read(p) }

func (s *narStream) Close() error {
	s.dec.Close()
	return s.body.Close()
}

// verify checks, once the NAR was read, that nothing follows it and that sizes and hashes are
// the narinfo's.
func (s *narStream) verify(ni *narinfo.NarInfo) error {
	p := ni.StorePath
	if n, _ := io.Copy(io.Discard, s.nar); n > 0 {
		return integrityf("NAR of %s from %s: data after the end of the archive", p, s.source)
	}
	if s.nar.n != ni.NarSize {
		return integrityf("NAR of %s from %s: NarSize is %d but the NAR has %d bytes", p, s.source, ni.NarSize, s.nar.n)
	}
	if !s.nar.matches(ni.NarHash) {
		return integrityf("NAR of %s from %s: hash mismatch: NarHash is %s, got sha256:%s", p, s.source, ni.NarHash.String(), nixbase32.EncodeToString(s.nar.h.Sum(nil)))
	}
	// Compressed formats may end with an index the decompressor does not read.
	if _, err := io.Copy(io.Discard, s.file); err != nil {
		return fmt.Errorf("NAR of %s from %s: %w", p, s.source, err)
	}
	if ni.FileSize > 0 && s.file.n != ni.FileSize {
		return integrityf("NAR file of %s from %s: FileSize is %d but the file has %d bytes", p, s.source, ni.FileSize, s.file.n)
	}
	if ni.FileHash != nil && !s.file.matches(ni.FileHash) {
		return integrityf("NAR file of %s from %s: hash mismatch: FileHash is %s, got sha256:%s", p, s.source, ni.FileHash.String(), nixbase32.EncodeToString(s.file.h.Sum(nil)))
	}
	return nil
}

func nixbase32Sum(hr *hashReader) string {
	return nixbase32.EncodeToString(hr.h.Sum(nil))
}

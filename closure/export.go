// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/wire"
)

// exportMagic follows each NAR in a `nix-store --export` stream ("NIXE").
const exportMagic = 0x4558494e

const (
	maxPathLen    = 4096
	maxReferences = 1 << 16
)

// exportEntry is one path of an export stream: its metadata and where its NAR lies in the file.
type exportEntry struct {
	info   PathInfo
	offset int64
	length int64
}

// countingReader tracks the offset in the stream, so NARs can be read again in place.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// readExport parses a `nix-store --export` stream: for each path a 1, its NAR, the magic, the
// path, its references, its deriver and a legacy signature flag; then a 0. NARs are walked (and
// so checked as an import would) and hashed; they are not kept.
func readExport(r io.Reader) ([]exportEntry, error) {
	cr := &countingReader{r: bufio.NewReaderSize(r, 256<<10)}
	var entries []exportEntry
	seen := map[string]bool{}
	for i := 0; ; i++ {
		more, err := wire.ReadUint64(cr)
		if err != nil {
			return nil, fmt.Errorf("export stream truncated before entry %d: %w", i, err)
		}
		if more == 0 {
			break
		}
		if more != 1 {
			return nil, fmt.Errorf("not a nix-store --export stream (entry %d starts with %d)", i, more)
		}
		start := cr.n
		hr := newHashReader(cr, nil)
		if err := walkNAR(hr, func(*nar.Header, io.Reader) error { return nil }); err != nil {
			return nil, fmt.Errorf("export stream entry %d: %w", i, err)
		}
		e := exportEntry{offset: start, length: cr.n - start}
		e.info.NarSize = hr.n
		e.info.NarHash = "sha256:" + nixbase32.EncodeToString(hr.h.Sum(nil))
		if magic, err := wire.ReadUint64(cr); err != nil || magic != exportMagic {
			return nil, fmt.Errorf("export stream entry %d: no export marker after the NAR", i)
		}
		if e.info.Path, err = wire.ReadString(cr, maxPathLen); err != nil {
			return nil, fmt.Errorf("export stream entry %d: %w", i, err)
		}
		if _, err := ParsePath(e.info.Path); err != nil {
			return nil, fmt.Errorf("export stream entry %d: %w", i, err)
		}
		if seen[e.info.Path] {
			return nil, fmt.Errorf("export stream holds %s twice", e.info.Path)
		}
		seen[e.info.Path] = true
		nrefs, err := wire.ReadUint64(cr)
		if err != nil || nrefs > maxReferences {
			return nil, fmt.Errorf("export stream entry %s: bad reference count", e.info.Path)
		}
		for j := uint64(0); j < nrefs; j++ {
			ref, err := wire.ReadString(cr, maxPathLen)
			if err != nil {
				return nil, fmt.Errorf("export stream entry %s: %w", e.info.Path, err)
			}
			if _, err := ParsePath(ref); err != nil {
				return nil, fmt.Errorf("export stream entry %s: reference %w", e.info.Path, err)
			}
			e.info.References = append(e.info.References, ref)
		}
		if _, err := wire.ReadString(cr, maxPathLen); err != nil { // deriver
			return nil, fmt.Errorf("export stream entry %s: %w", e.info.Path, err)
		}
		hasSig, err := wire.ReadUint64(cr)
		if err == nil && hasSig == 1 {
			_, err = wire.ReadString(cr, maxPathLen)
		}
		if err != nil {
			return nil, fmt.Errorf("export stream entry %s: %w", e.info.Path, err)
		}
		entries = append(entries, e)
	}
	if _, err := cr.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		return nil, errors.New("export stream: data after its end")
	}
	return entries, nil
}

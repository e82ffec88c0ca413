// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"bytes"
	"github.com/nix-community/go-nix/pkg/nar"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/wire"
	"github.com/shoenig/test/must"
)

// tnode is a NAR node written token by token, so tests can build archives that no honest
// writer would produce.
type tnode struct {
	typ     string // "regular", "directory" or "symlink"
	exec    bool
	data    string
	target  string
	entries []tentry
}

type tentry struct {
	name string
	node tnode
}

func file(data string) tnode          { return tnode{typ: "regular", data: data} }
func dir(entries ...tentry) tnode     { return tnode{typ: "directory", entries: entries} }
func symlink(target string) tnode     { return tnode{typ: "symlink", target: target} }
func ent(name string, n tnode) tentry { return tentry{name, n} }

func writeNode(t *testing.T, w io.Writer, n tnode) {
	t.Helper()
	str := func(s string) { must.NoError(t, wire.WriteString(w, s)) }
	str("(")
	str("type")
	str(n.typ)
	switch n.typ {
	case "regular":
		if n.exec {
			str("executable")
			str("")
		}
		str("contents")
		str(n.data)
	case "symlink":
		str("target")
		str(n.target)
	case "directory":
		for _, e := range n.entries {
			str("entry")
			str("(")
			str("name")
			str(e.name)
			str("node")
			writeNode(t, w, e.node)
			str(")")
		}
	}
	str(")")
}

func narOf(t *testing.T, n tnode) []byte {
	t.Helper()
	var b bytes.Buffer
	must.NoError(t, wire.WriteString(&b, "nix-archive-1"))
	writeNode(t, &b, n)
	return b.Bytes()
}

func unpackTo(t *testing.T, n tnode) (string, error) {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "out")
	u := &unpacker{dst: dst}
	err := walkNAR(bytes.NewReader(narOf(t, n)), u.entry)
	if err == nil {
		err = u.finish()
	}
	return dst, err
}

func TestUnpackWritesNixStoreModes(t *testing.T) {
	exe := file("#!/bin/sh\n")
	exe.exec = true
	dst, err := unpackTo(t, dir(
		ent("bin", dir(ent("run", exe))),
		ent("etc", symlink("/etc")),
		ent("readme", file("hello")),
	))
	must.NoError(t, err)
	fi, err := os.Lstat(filepath.Join(dst, "bin", "run"))
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o555), fi.Mode().Perm())
	must.Eq(t, int64(1), fi.ModTime().Unix())
	fi, err = os.Lstat(filepath.Join(dst, "readme"))
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o444), fi.Mode().Perm())
	// A symlink is written as one, not followed, even when it points at the host's /etc.
	target, err := os.Readlink(filepath.Join(dst, "etc"))
	must.NoError(t, err)
	must.Eq(t, "/etc", target)
	fi, err = os.Lstat(dst)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o555), fi.Mode().Perm())
	must.Eq(t, int64(1), fi.ModTime().Unix())
}

func TestUnpackRefusesEscapes(t *testing.T) {
	for name, n := range map[string]tnode{
		"dot-dot":          dir(ent("..", file("x"))),
		"dot":              dir(ent(".", file("x"))),
		"empty name":       dir(ent("", file("x"))),
		"absolute name":    dir(ent("/etc", file("x"))),
		"name with slash":  dir(ent("a/../../b", file("x"))),
		"nested dot-dot":   dir(ent("a", dir(ent("..", dir(ent("..", file("x"))))))),
		"duplicate":        dir(ent("a", file("x")), ent("a", file("y"))),
		"symlink then dir": dir(ent("a", symlink("/etc")), ent("a", dir(ent("passwd", file("x"))))),
		"unordered":        dir(ent("b", file("x")), ent("a", file("y"))),
		"NUL in name":      dir(ent("a\x00b", file("x"))),
		"device type":      {typ: "chardevice"},
	} {
		t.Run(name, func(t *testing.T) {
			dst, err := unpackTo(t, n)
			must.Error(t, err)
			// Nothing was written outside the destination.
			_, serr := os.Lstat(filepath.Join(filepath.Dir(dst), "etc"))
			must.True(t, os.IsNotExist(serr))
			_, serr = os.Lstat(filepath.Join(filepath.Dir(dst), "b"))
			must.True(t, os.IsNotExist(serr))
		})
	}
}

func TestWalkNARRefusesTruncated(t *testing.T) {
	b := narOf(t, dir(ent("a", file(strings.Repeat("x", 1000)))))
	err := walkNAR(bytes.NewReader(b[:len(b)-100]), func(*nar.Header, io.Reader) error { return nil })
	must.Error(t, err)
}

func TestTopInfo(t *testing.T) {
	exe := file("#!/bin/sh\n")
	exe.exec = true
	for name, tc := range map[string]struct {
		n    tnode
		want string
	}{
		"container":       {dir(ent("init", exe)), ""},
		"init symlink":    {dir(ent("init", symlink("/nix/store/x/bin/init"))), ""},
		"no init":         {dir(ent("etc", dir())), "no executable init"},
		"init not exec":   {dir(ent("init", file("x"))), "no executable init"},
		"kernel":          {dir(ent("init", exe), ent("kernel", symlink("/k"))), "has a kernel"},
		"not a directory": {exe, "no executable init"},
	} {
		t.Run(name, func(t *testing.T) {
			var top topInfo
			must.NoError(t, walkNAR(bytes.NewReader(narOf(t, tc.n)), func(h *nar.Header, _ io.Reader) error {
				top.entry(h)
				return nil
			}))
			err := top.check("/nix/store/00000000000000000000000000000000-x")
			if tc.want == "" {
				must.NoError(t, err)
			} else {
				must.ErrorContains(t, err, tc.want)
			}
		})
	}
}

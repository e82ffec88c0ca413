// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Package closure brings NixOS system closures onto a host: it reads binary caches (directories
// and HTTP servers) and nix-store --export streams, checks signatures and hashes the way Nix does,
// unpacks NARs safely, and keeps the paths in the host's Nix store or a store of its own. It knows
// nothing about Nomad or systemd.
package closure

import (
	"fmt"
	"path"
	"sort"
	"strings"

	"github.com/nix-community/go-nix/pkg/storepath"
)

// StoreDir is where store paths live, inside machines and in the host's Nix store.
const StoreDir = storepath.StoreDir

// PathInfo is what the store records about a valid path.
type PathInfo struct {
	// Path is absolute: /nix/store/<hash>-<name>.
	Path string `json:"path"`
	// NarHash is "sha256:<nixbase32>".
	NarHash string `json:"narHash"`
	NarSize uint64 `json:"narSize"`
	// References are absolute store paths.
	References []string `json:"references"`
	// SignedBy names the trusted keys that signed the path; empty for unsigned imports.
	SignedBy []string `json:"signedBy,omitempty"`
}

// ParsePath checks that p is an absolute store path and returns its base name (<hash>-<name>).
func ParsePath(p string) (string, error) {
	// go-nix parses by offsets: it lets other store directories, longer hashes and trailing
	// slashes through, so the path must also be what it parses to.
	sp, err := storepath.FromAbsolutePath(p)
	if err != nil || sp.Absolute() != p {
		return "", fmt.Errorf("%q is not a Nix store path like %s/<32-character hash>-<name>", p, StoreDir)
	}
	return sp.String(), nil
}

// hashPart is the 32-character hash of an absolute or base store path name.
func hashPart(p string) string {
	base := path.Base(p)
	h, _, _ := strings.Cut(base, "-")
	return h
}

// absolute turns a reference as narinfo files write it (<hash>-<name>) into an absolute path.
func absolute(ref string) string {
	if strings.HasPrefix(ref, StoreDir+"/") {
		return ref
	}
	return StoreDir + "/" + ref
}

// topoSort orders paths so that every path comes after the paths it references (Nix registers a
// path only once its references are valid). Ties are broken by name, so the order is stable.
func topoSort(infos map[string]*PathInfo) ([]string, error) {
	names := make([]string, 0, len(infos))
	for p := range infos {
		names = append(names, p)
	}
	sort.Strings(names)
	const (
		unseen = iota
		visiting
		done
	)
	state := make(map[string]int, len(infos))
	out := make([]string, 0, len(infos))
	var visit func(p string) error
	visit = func(p string) error {
		switch state[p] {
		case visiting:
			return fmt.Errorf("store path %s is part of a reference cycle", p)
		case done:
			return nil
		}
		state[p] = visiting
		refs := append([]string(nil), infos[p].References...)
		sort.Strings(refs)
		for _, r := range refs {
			if r == p {
				continue
			}
			if _, ok := infos[r]; ok {
				if err := visit(r); err != nil {
					return err
				}
			}
		}
		state[p] = done
		out = append(out, p)
		return nil
	}
	for _, p := range names {
		if err := visit(p); err != nil {
			return nil, err
		}
	}
	return out, nil
}

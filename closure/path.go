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

	"github.com/nix-community/go-nix/pkg/nixbase32"
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
// The error says what is wrong with p.
func ParsePath(p string) (string, error) {
	rest, inStore := strings.CutPrefix(p, StoreDir+"/")
	switch {
	case !inStore:
		return "", fmt.Errorf("%q is not in %s: a store path is %s/<32-character hash>-<name>", p, StoreDir, StoreDir)
	case path.Clean(p) != p:
		return "", fmt.Errorf("%q is not a clean path: it has '.', '..', a repeated '/' or a trailing '/'", p)
	}
	name, below, _ := strings.Cut(rest, "/")
	if below != "" {
		return "", fmt.Errorf("%q is inside the store path %s/%s, not a store path itself", p, StoreDir, name)
	}
	// go-nix's parser goes by offsets and lets longer hashes and other characters through;
	// its pattern is strict.
	if !storepath.PathRe.MatchString(p) {
		hash, _, dash := strings.Cut(name, "-")
		if !dash || len(hash) != nixbase32.EncodedLen(storepath.PathHashSize) || nixbase32.ValidateString(hash) != nil {
			return "", fmt.Errorf("%q is not a store path: its name %q must start with a 32-character Nix base32 hash and '-'", p, name)
		}
		return "", fmt.Errorf("%q is not a store path: the name after the hash must be one or more letters, digits and '+-._?=', not starting with '.'", p)
	}
	sp, err := storepath.FromAbsolutePath(p)
	if err != nil {
		return "", fmt.Errorf("%q is not a store path: %w", p, err)
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

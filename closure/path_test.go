// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"fmt"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
)

func TestParsePath(t *testing.T) {
	const hash = "0c7hkqjx3pb2xvdm0ncvb8hgxwqbb1ps"
	base, err := ParsePath("/nix/store/" + hash + "-nixos-system-web")
	must.NoError(t, err)
	must.EqOp(t, hash+"-nixos-system-web", base)
	// go-nix's parser alone accepts each of these; the error says what is wrong.
	for p, why := range map[string]string{
		"/nix/store/" + hash + "-nixos-system-web/":      "not a clean path",
		"/nix/store/" + hash + "x-nixos-system-web":      "must start with a 32-character Nix base32 hash",
		"/nix/store/e" + hash[1:] + "-nixos-system-web":  "must start with a 32-character Nix base32 hash",
		"/nix/store/" + hash + "-nixos system":           "the name after the hash must be one or more letters",
		"/nix/store/" + hash + "-":                       "the name after the hash must be one or more letters",
		"/nix/store/" + hash + "-.hidden":                "not starting with '.'",
		"/gnu/store/" + hash + "-nixos-system-web":       "is not in /nix/store",
		"/nix/var/nix/profiles/web":                      "is not in /nix/store",
		"/nix/store/" + hash + "-web/../../etc":          "not a clean path",
		"/nix/store/" + hash + "-nixos-system-web/sw":    "inside the store path /nix/store/" + hash + "-nixos-system-web",
		"/nix/store/" + hash + "-nixos-system-web/init":  "inside the store path",
		"/nix/store/" + hash + "-nixos-system-web\x00":   "the name after the hash",
		"/nix/store/" + hash[:31] + "-nixos-system-web":  "must start with a 32-character Nix base32 hash",
		"/nix/store/" + strings.ToUpper(hash) + "-web":   "must start with a 32-character Nix base32 hash",
		"/nix/store/" + hash + "-nixos-system-web//init": "not a clean path",
	} {
		_, err := ParsePath(p)
		must.ErrorContains(t, err, why, must.Sprint(p))
		must.ErrorContains(t, err, fmt.Sprintf("%q", p))
	}
}

func TestTopoSort(t *testing.T) {
	infos := map[string]*PathInfo{
		"/nix/store/c": {References: []string{"/nix/store/a", "/nix/store/b", "/nix/store/c"}},
		"/nix/store/b": {References: []string{"/nix/store/a", "/nix/store/elsewhere"}},
		"/nix/store/a": {},
	}
	order, err := topoSort(infos)
	must.NoError(t, err)
	must.Eq(t, []string{"/nix/store/a", "/nix/store/b", "/nix/store/c"}, order)
	infos["/nix/store/a"].References = []string{"/nix/store/c"}
	_, err = topoSort(infos)
	must.ErrorContains(t, err, "reference cycle")
}

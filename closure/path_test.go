// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"testing"

	"github.com/shoenig/test/must"
)

func TestParsePath(t *testing.T) {
	const hash = "0c7hkqjx3pb2xvdm0ncvb8hgxwqbb1ps"
	base, err := ParsePath("/nix/store/" + hash + "-nixos-system-web")
	must.NoError(t, err)
	must.EqOp(t, hash+"-nixos-system-web", base)
	// go-nix's parser alone accepts each of these.
	for _, p := range []string{
		"/nix/store/" + hash + "-nixos-system-web/",
		"/nix/store/" + hash + "x-nixos-system-web",
		"/gnu/store/" + hash + "-nixos-system-web",
		"/nix/store/" + hash + "-web/../../etc",
	} {
		_, err := ParsePath(p)
		must.Error(t, err, must.Sprint(p))
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

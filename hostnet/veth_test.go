// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package hostnet

import (
	"testing"

	"github.com/shoenig/test/must"
)

// Host-side link names fit Linux's 15 characters, stay stable for a machine, and differ
// between machines.
func TestVethNames(t *testing.T) {
	a := NewVeth("nomad-3f2504e0-web", Addressing{})
	must.EqOp(t, a, NewVeth("nomad-3f2504e0-web", Addressing{}))
	b := NewVeth("nomad-3f2504e0-db", Addressing{})
	must.NotEq(t, a.Host, b.Host)
	for _, v := range []Veth{a, b} {
		must.StrHasPrefix(t, "vn-", v.Host)
		must.Len(t, 15, []byte(v.Host))
	}
}

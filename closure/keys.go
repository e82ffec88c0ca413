// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package closure

import (
	"fmt"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
)

// TrustedKeys are the public keys whose signatures make a path acceptable.
type TrustedKeys []signature.PublicKey

// ParseTrustedKeys reads keys in nix.conf's trusted-public-keys format, "name:base64".
func ParseTrustedKeys(keys []string) (TrustedKeys, error) {
	out := make(TrustedKeys, 0, len(keys))
	for i, k := range keys {
		pk, err := signature.ParsePublicKey(k)
		if err != nil {
			return nil, fmt.Errorf("trusted_public_keys[%d] = %q: must be a Nix public key \"name:base64\" as `nix key convert-secret-to-public` prints it: %w", i, k, err)
		}
		out = append(out, pk)
	}
	return out, nil
}

// Verify returns the names of the trusted keys with a valid signature on ni.
func (t TrustedKeys) Verify(ni *narinfo.NarInfo) []string {
	fp := ni.Fingerprint()
	var signers []string
	for _, sig := range ni.Signatures {
		for _, k := range t {
			if k.Name == sig.Name && k.Verify(fp, sig) {
				signers = append(signers, k.Name)
				break
			}
		}
	}
	return signers
}

// names lists the keys for error messages.
func (t TrustedKeys) names() []string {
	out := make([]string, len(t))
	for i, k := range t {
		out[i] = k.Name
	}
	return out
}

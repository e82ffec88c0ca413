// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"fmt"
	"path/filepath"
	"sort"
	"strings"

	"github.com/nomad-nixos/nomad-driver-nixos/nspawn"
)

// credentialsRunDir holds the staged credentials of each machine, on the tmpfs /run is, as
// Nomad's secrets directories are: a secret copied there never reaches a disk.
const credentialsRunDir = "/run/nomad-driver-nixos/credentials"

// credentialSources checks the task's credentials: each a systemd credential name and a file
// of the task's secrets directory, given relative to it ("db-password") or as "secrets/...",
// the form of a template's destination.
func (c *TaskConfig) credentialSources() ([]nspawn.CredentialSource, error) {
	files := map[string]string{}
	for _, m := range c.Credentials {
		for name, file := range m {
			if _, dup := files[name]; dup {
				return nil, fmt.Errorf("credentials name = %q: given twice", name)
			}
			files[name] = file
		}
	}
	if len(files) == 0 {
		return nil, nil
	}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	out := make([]nspawn.CredentialSource, 0, len(names))
	for _, name := range names {
		file := files[name]
		if !nspawn.ValidCredentialName(name) {
			return nil, fmt.Errorf("credentials name = %q: must be a file name of printable ASCII characters without '/' or ':', at most 255 bytes, as a guest service names it in LoadCredential=", name)
		}
		rel := strings.TrimPrefix(filepath.Clean(file), "secrets/")
		if file == "" || !filepath.IsLocal(rel) || strings.ContainsRune(file, 0) {
			return nil, fmt.Errorf("credentials.%s = %q: must be a file of the task's secrets directory, as \"db-password\" or \"secrets/db-password\" (a template's destination), without '..'", name, file)
		}
		out = append(out, nspawn.CredentialSource{Name: name, File: rel})
	}
	return out, nil
}

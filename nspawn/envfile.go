// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package nspawn

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// ValidEnvName tells whether name can be an environment variable for systemd and the guest.
func ValidEnvName(name string) bool { return envName.MatchString(name) }

// EnvFile renders env in systemd's EnvironmentFile= format: one KEY="value" line each, with the
// characters that are special inside double quotes escaped; newlines stay literal, which systemd
// reads as part of a quoted value. Names systemd would reject are left
// out and returned.
func EnvFile(env map[string]string) (content string, skipped []string) {
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		if !ValidEnvName(k) {
			skipped = append(skipped, k)
			continue
		}
		b.WriteString(k)
		b.WriteString(`="`)
		for _, r := range env[k] {
			switch r {
			case '\\', '"', '`', '$':
				b.WriteByte('\\')
				b.WriteRune(r)
			default:
				b.WriteRune(r)
			}
		}
		b.WriteString("\"\n")
	}
	return b.String(), skipped
}

// WriteEnvFile writes env to path atomically. The file is world-readable: the guest runs in a
// user namespace where host root's files belong to nobody, and its services must read it.
func WriteEnvFile(path string, env map[string]string) ([]string, error) {
	content, skipped := EnvFile(env)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".env-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Close(); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return nil, fmt.Errorf("writing %s: %w", path, err)
	}
	return skipped, nil
}

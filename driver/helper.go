// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// The console helper (cmd/nomad-driver-nixos-console) travels inside the plugin: Nomad loads
// every executable in its plugin_dir as a plugin, so the plugin must stay one file. `make build`
// builds the helper into consolehelper/ first; the directory's README keeps the embed valid
// without it, for `go vet` and unit tests.
//
//go:embed consolehelper
var consoleHelperFS embed.FS

const consoleHelperName = "nomad-driver-nixos-console"

var errNoConsoleHelper = errors.New("this plugin binary was built without its console helper; build it with `make build` (or the flake's package)")

// installConsoleHelper writes the embedded helper to <dataDir>/bin/console-<hash>, once per
// helper version, and returns its path. A file of that name is trusted only if its hash matches.
func installConsoleHelper(dataDir string) (string, error) {
	bin, err := consoleHelperFS.ReadFile("consolehelper/" + consoleHelperName)
	if errors.Is(err, fs.ErrNotExist) {
		return "", errNoConsoleHelper
	}
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(bin)
	dir := filepath.Join(dataDir, "bin")
	path := filepath.Join(dir, "console-"+hex.EncodeToString(sum[:8]))
	if have, err := os.ReadFile(path); err == nil && bytes.Equal(have, bin) {
		return path, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("installing the console helper: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".console-")
	if err != nil {
		return "", fmt.Errorf("installing the console helper: %w", err)
	}
	_, err = tmp.Write(bin)
	if err == nil {
		err = tmp.Chmod(0o700)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		_ = os.Remove(tmp.Name())
		return "", fmt.Errorf("installing the console helper at %s: %w", path, err)
	}
	return path, nil
}

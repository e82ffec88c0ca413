# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# The plugin binary, bin/nomad-driver-nixos. Called from ../flake.nix with a
# nixpkgs whose Go is at least the one go.mod asks for.
{ lib, buildGoModule, go }:
let
  root = ../.;
  # "go 1.26.8" in go.mod; GOTOOLCHAIN=local in the build, so an older Go fails.
  goMod = builtins.match ".*\ngo ([0-9.]+)\n.*" (builtins.readFile (root + "/go.mod"));
  goWanted = if goMod == null then "0" else builtins.head goMod;
  versionMatch = builtins.match ''.*PluginVersion = "([^"]+)".*'' (builtins.readFile (root + "/driver/driver.go"));
in
lib.throwIfNot (lib.versionAtLeast go.version goWanted)
  "nomad-driver-nixos: go.mod asks for Go ${goWanted}, this nixpkgs has Go ${go.version}; build it with a newer nixpkgs (the flake's nixpkgs-go input)"
  (buildGoModule {
    pname = "nomad-driver-nixos";
    version = if versionMatch == null then "unknown" else builtins.head versionMatch;

    # Only what the binary is built from, so README or test edits do not rebuild it.
    src = lib.fileset.toSource {
      inherit root;
      fileset = lib.fileset.intersection
        (lib.fileset.unions [
          (root + "/go.mod")
          (root + "/go.sum")
          (root + "/cmd")
          (root + "/console")
          (root + "/driver")
          (root + "/nspawn")
        ])
        (lib.fileset.fileFilter (file: !lib.hasSuffix "_test.go" file.name) root);
    };

    # Not known until the first build: it fails with "hash mismatch ... got:
    # sha256-..."; put that here. It changes whenever go.sum does.
    vendorHash = lib.fakeHash;

    subPackages = [ "cmd/nomad-driver-nixos" ];
    # The plugin embeds its console helper (driver/helper.go): build that first, as `make build`
    # does. bin/ holds the plugin alone, since Nomad loads every executable in plugin_dir.
    preBuild = ''
      go build -trimpath -ldflags "-s -w" -o driver/consolehelper/nomad-driver-nixos-console ./cmd/nomad-driver-nixos-console
    '';
    # A static binary, like `make build`.
    env.CGO_ENABLED = 0;
    ldflags = [ "-s" "-w" ];

    meta = {
      description = "Nomad task driver that boots NixOS systems as systemd-nspawn machines";
      license = lib.licenses.mpl20;
      platforms = lib.platforms.linux;
      mainProgram = "nomad-driver-nixos";
    };
  })

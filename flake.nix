# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# The driver package, the NixOS modules for guests and Nomad clients, and two
# example guest systems. How to use them: example/README.md.
{
  description = "nomad-driver-nixos: a Nomad task driver (nixos-nspawn) that boots NixOS systems as systemd-nspawn machines";

  inputs = {
    # What the modules and example systems are written against.
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";
    # Only for building the driver: go.mod asks for a newer Go than nixos-25.05
    # has. The binary is static, so which nixpkgs builds it does not matter.
    nixpkgs-go.url = "github:NixOS/nixpkgs/nixos-unstable";
  };

  outputs =
    { self, nixpkgs, nixpkgs-go }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" ];
      forAllSystems = lib.genAttrs systems;

      guestSystem =
        module:
        lib.nixosSystem {
          modules = [
            module
            { nixpkgs.hostPlatform = "x86_64-linux"; }
          ];
        };

      # Not a machine to deploy: the smallest client that evaluates and builds
      # with the host module, for `nix flake check`.
      hostCheck = lib.nixosSystem {
        modules = [
          self.nixosModules.host
          {
            nixpkgs.hostPlatform = "x86_64-linux";
            # nixpkgs' Nomad (>= 1.7) is under the BUSL, which nixpkgs counts as unfree.
            nixpkgs.config.allowUnfreePredicate = pkg: lib.getName pkg == "nomad";
            services.nomad-driver-nixos.enable = true;
            boot.loader.grub.enable = false;
            fileSystems."/" = {
              device = "none";
              fsType = "tmpfs";
            };
            system.stateVersion = "25.05";
          }
        ];
      };
    in
    {
      packages = forAllSystems (system: rec {
        nomad-driver-nixos = nixpkgs-go.legacyPackages.${system}.callPackage ./example/package.nix { };
        default = nomad-driver-nixos;
      });

      nixosModules = {
        guest = ./example/modules/guest.nix;
        host =
          { lib, pkgs, ... }:
          {
            imports = [ ./example/modules/host.nix ];
            services.nomad-driver-nixos.package =
              lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          };
      };

      # nix build .#nixosConfigurations.web.config.system.build.toplevel
      nixosConfigurations = {
        web = guestSystem ./example/systems/web.nix;
        batch = guestSystem ./example/systems/batch.nix;
      };

      checks = forAllSystems (system: {
        driver = self.packages.${system}.default;
        web = self.nixosConfigurations.web.config.system.build.toplevel;
        batch = self.nixosConfigurations.batch.config.system.build.toplevel;
        host = hostCheck.config.system.build.toplevel;
      });
    };
}

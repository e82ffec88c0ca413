# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# NixOS module for a Nomad CLIENT that runs the nomad-driver-nixos plugin
# (task driver "nixos-nspawn"), on top of nixpkgs' services.nomad.
# `package` has no default here; the flake's nixosModules.host sets it.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.nomad-driver-nixos;
  json = pkgs.formats.json { };
in
{
  options.services.nomad-driver-nixos = {
    enable = lib.mkEnableOption "the nomad-driver-nixos Nomad task driver plugin (driver \"nixos-nspawn\") on this Nomad client";

    package = lib.mkOption {
      type = lib.types.package;
      description = ''
        The plugin package; it must contain `bin/nomad-driver-nixos`. The
        flake's `nixosModules.host` defaults it to the flake's
        `packages.<system>.default`.
      '';
    };

    settings = lib.mkOption {
      type = lib.types.submodule {
        freeformType = json.type;
        options = {
          enabled = lib.mkOption {
            type = lib.types.bool;
            default = true;
            description = "`false` makes the driver undetected and refuse tasks.";
          };
          data_dir = lib.mkOption {
            type = lib.types.str;
            default = "/var/lib/nomad-driver-nixos";
            description = "Machine roots and per-machine state live in `<data_dir>/machines/<machine>/`.";
          };
          cni_path = lib.mkOption {
            type = lib.types.str;
            default = "${pkgs.cni-plugins}/bin";
            description = "Where the CNI plugins of Nomad's bridge mode are: the agent's `client.cni_path`, which this module sets to the same.";
          };
        };
      };
      default = { };
      example = {
        slice = "machine.slice";
        tasks_max = 4096;
      };
      description = ''
        The plugin's configuration: the `config` block of
        `plugin "nomad-driver-nixos"` in the Nomad agent configuration. Other
        keys (`slice`, `tasks_max`, `nspawn_path`, `systemd_run_path`,
        `nsenter_path`, `console_backlog`) are passed on as given; see the
        project README for their meaning and defaults.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = config.security.allowUserNamespaces;
        message = "services.nomad-driver-nixos: every machine runs in a user namespace; security.allowUserNamespaces must be true";
      }
    ];

    services.nomad = {
      enable = lib.mkDefault true;
      # The driver creates machines and transient units: Nomad runs as root.
      dropPrivileges = false;
      # nixpkgs links the bin/ of each of these into Nomad's -plugin-dir.
      extraSettingsPlugins = [ cfg.package ];
      # The plugin finds systemd-nspawn and systemd-run (systemd)
      # and nsenter (util-linux) in PATH, which it inherits from the agent.
      # iptables for the firewall and portmap CNI plugins of bridge mode.
      extraPackages = [
        config.systemd.package
        pkgs.util-linux
        pkgs.iptables
      ];
      settings = {
        client.enabled = lib.mkDefault true;
        # Bridge mode (network { mode = "bridge" }): Nomad's CNI plugins.
        client.cni_path = lib.mkDefault cfg.settings.cni_path;
        plugin."nomad-driver-nixos".config = cfg.settings;
        # Without it Nomad asks drivers for no resource usage at all.
        telemetry.publish_allocation_metrics = lib.mkDefault true;
      };
    };

    # The driver addresses each machine's veth link itself (host end
    # vn-<hash>) and forwards the task's ports with nftables rules of its
    # own; the machines reach beyond the host through IP forwarding, with
    # the driver's masquerading.
    boot.kernel.sysctl."net.ipv4.ip_forward" = lib.mkDefault 1;
    boot.kernel.sysctl."net.ipv6.conf.all.forwarding" = lib.mkDefault 1;
    # The inotify instances of every machine count against root's: a NixOS
    # guest takes about 8 (systemd, D-Bus, logind, its console forwarder),
    # and the kernel's default of 128 holds fewer than 16 machines.
    boot.kernel.sysctl."fs.inotify.max_user_instances" = lib.mkDefault 8192;
    # Other network managers must leave the driver's links alone.
    networking.dhcpcd.denyInterfaces = [ "vn-*" ];
    networking.networkmanager.unmanaged = [ "interface-name:vn-*" ];
  };
}

# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# NixOS module for GUEST systems: NixOS systems that the nomad-driver-nixos
# task driver (driver = "nixos-nspawn") boots as systemd-nspawn machines.
# Options live under `nomad.guest`; `nomad.guest.enable = true` makes the
# system bootable by the driver. `system.stateVersion` is left to the user.
{ config, lib, ... }:
let
  cfg = config.nomad.guest;

  # `systemd.services` attribute name of the main unit ("batch.service" -> "batch").
  mainName = if cfg.mainUnit == null then null else lib.removeSuffix ".service" cfg.mainUnit;
  mainService = config.systemd.services.${mainName};
in
{
  options.nomad.guest = {
    enable = lib.mkEnableOption "the settings a NixOS system needs to run as a task of Nomad's nixos-nspawn driver";

    envFile = lib.mkOption {
      type = lib.types.str;
      default = "/secrets/nomad.env";
      readOnly = true;
      description = ''
        Where the driver puts the task environment (NOMAD_ALLOC_ID,
        NOMAD_META_*, the job's `env` block, ...) inside the machine, in
        systemd `EnvironmentFile=` format. Services never see the variables
        the driver gives PID 1; they must read this file.
      '';
    };

    envFileServices = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "nginx" "batch" ];
      description = ''
        Names of `systemd.services` that get the Nomad task environment:
        each gets `EnvironmentFile=-''${nomad.guest.envFile}` (the `-` lets
        the system also boot outside Nomad, without the file).
      '';
    };

    credentials = lib.mkOption {
      type = lib.types.attrsOf (lib.types.listOf lib.types.str);
      default = { };
      example = { web-page = [ "greeting" ]; postgresql = [ "db-password" ]; };
      description = ''
        Credentials of the machine each service of `systemd.services` gets,
        by name: the names of the task config's `credentials` map, whose
        files the driver hands to the machine's systemd. Each becomes
        `LoadCredential=NAME`, so the service reads it from
        `$CREDENTIALS_DIRECTORY/NAME` (`%d/NAME` in unit settings), readable
        by the service's user alone. A service whose credential the task
        did not give starts without it (systemd skips a missing system
        credential), so a service that needs it should check for the file.
      '';
    };

    forwardJournalToConsole = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Whether journald copies log messages to the console. The driver
        forwards the machine's console to `nomad alloc logs` (stdout), so
        this is what makes service logs show up there.
      '';
    };

    consoleLogLevel = lib.mkOption {
      type = lib.types.enum [ "emerg" "alert" "crit" "err" "warning" "notice" "info" "debug" ];
      default = "info";
      description = "journald's `MaxLevelConsole=`: the least important level copied to the console.";
    };

    mainUnit = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "batch.service";
      description = ''
        A service of `systemd.services` (with or without the `.service`
        suffix) whose end ends the machine, for batch jobs. When it succeeds
        the machine exits with status 0; when it fails, with the exit status
        of its main process (255 when that was killed by a signal), unless
        `nomad.guest.mainUnitFailureExitStatus` is set. Nomad sees that
        status as the task's exit code.

        Done with `SuccessAction=exit` and `FailureAction=exit` on the unit
        (systemd.unit(5)). Use `Type=exec` or `simple` rather than
        `oneshot`: a oneshot unit wanted by multi-user.target holds up the
        end of boot, so the machine reports ready only after the unit ends
        and the task's `ready_timeout` would have to cover the whole run.
      '';
    };

    mainUnitFailureExitStatus = lib.mkOption {
      type = lib.types.nullOr (lib.types.ints.between 0 255);
      default = null;
      example = 1;
      description = ''
        `FailureActionExitStatus=` of the main unit. `null` propagates the
        exit status of the unit's main process. A unit that fails before
        its main process runs (an `ExecStartPre=`/`preStart` failed) has no
        status to propagate; systemd then keeps its default return value,
        0, and Nomad would see success. Set this when that matters.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    # Containers have no kernel; the Nspawn profile also leaves /dev, /proc,
    # /run etc. to nspawn, which a user namespace requires (NixOS >= 25.05).
    boot.isNspawnContainer = true;

    services.journald.extraConfig = lib.mkIf cfg.forwardJournalToConsole ''
      ForwardToConsole=yes
      MaxLevelConsole=${cfg.consoleLogLevel}
    '';

    # With network_mode = "veth" the driver configures the machine's link
    # itself: eth0 gets an address of its pools (IPv4 and IPv6) and default
    # routes through the host before the guest's services start, the way
    # NixOS containers get hostAddress/localAddress. Nothing in the guest may
    # run DHCP on it or flush it.
    networking.useNetworkd = lib.mkDefault false;
    networking.useDHCP = false;
    networking.dhcpcd.enable = false;

    # The driver seeds /etc/resolv.conf (Nomad's dns block, or the host's
    # resolvers); the container profile's default hands it to resolvconf.
    networking.useHostResolvConf = lib.mkDefault true;

    # Only one link, eth0, carries the default route: reverse-path filtering
    # has nothing to check, and a container may not get the kernel modules it
    # needs loaded.
    networking.firewall.checkReversePath = lib.mkDefault false;

    # Read-only host store, no daemon socket: Nix inside the machine cannot work.
    nix.enable = lib.mkDefault false;

    systemd.services = lib.mkMerge [
      {
        # NixOS starts a login prompt on a container's console. The driver's
        # console is read-only and copied to the task's logs: nobody could log
        # in, the prompt would only clutter them. `nomad alloc exec` is the way in.
        # Priority 900: above nixpkgs' own mkDefault, below a plain definition.
        console-getty.enable = lib.mkOverride 900 false;
      }
      (lib.genAttrs cfg.envFileServices (_: {
        # A list, so that it adds to a service's own EnvironmentFile= entries.
        serviceConfig.EnvironmentFile = [ "-${cfg.envFile}" ];
      }))
      (lib.mapAttrs (_: names: {
        # A list, so that it adds to a service's own LoadCredential= entries.
        serviceConfig.LoadCredential = names;
      }) cfg.credentials)
      (lib.optionalAttrs (mainName != null) {
        ${mainName}.unitConfig = {
          SuccessAction = "exit";
          # Pinned: a unit may succeed with a SuccessExitStatus= other than 0,
          # and it also "succeeds" when stopped at shutdown.
          SuccessActionExitStatus = 0;
          FailureAction = "exit";
        } // lib.optionalAttrs (cfg.mainUnitFailureExitStatus != null) {
          FailureActionExitStatus = cfg.mainUnitFailureExitStatus;
        };
      })
    ];

    # Naming a service that nothing else defines would create an empty unit.
    assertions =
      map (name: {
        assertion = config.systemd.services.${name}.serviceConfig ? ExecStart;
        message = "nomad.guest.envFileServices: systemd.services.${name} has no ExecStart (or script); is the name right?";
      }) cfg.envFileServices
      ++ lib.mapAttrsToList (name: _: {
        assertion = config.systemd.services.${name}.serviceConfig ? ExecStart;
        message = "nomad.guest.credentials: systemd.services.${name} has no ExecStart (or script); is the name right?";
      }) cfg.credentials
      ++ lib.optional (mainName != null) {
        assertion = mainService.serviceConfig ? ExecStart;
        message = "nomad.guest.mainUnit: systemd.services.${mainName} has no ExecStart (or script); is the name right?";
      };

    warnings =
      lib.optional (mainName != null && (mainService.serviceConfig.Type or "simple") == "oneshot") ''
        nomad.guest.mainUnit: ${mainName} is Type=oneshot, so the machine reports ready only
        after it has ended: the task's ready_timeout must cover its whole run. Type=exec avoids that.
      ''
      ++ lib.optional (
        mainName != null && mainService.serviceConfig ? ExecStartPre && cfg.mainUnitFailureExitStatus == null
      ) ''
        nomad.guest.mainUnit: ${mainName} has ExecStartPre= (preStart); if that fails there is no exit
        status to propagate and the machine exits with 0. Set nomad.guest.mainUnitFailureExitStatus.
      '';
  };
}

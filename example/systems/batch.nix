# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# "batch": one piece of work whose end ends the machine, with its exit status
# as the task's exit code. Job: ../jobs/batch.nomad.hcl.
# Build: nix build .#nixosConfigurations.batch.config.system.build.toplevel
{ pkgs, ... }:
{
  imports = [ ../modules/guest.nix ];

  nomad.guest.enable = true;
  networking.hostName = "batch";
  system.stateVersion = "25.05";

  nomad.guest.mainUnit = "batch.service";
  nomad.guest.envFileServices = [ "batch" ];

  systemd.services.batch = {
    description = "Example batch work";
    wantedBy = [ "multi-user.target" ];
    # exec, not oneshot: the machine reports ready once this has started
    # (see nomad.guest.mainUnit), however long the work then takes.
    serviceConfig.Type = "exec";
    path = [ pkgs.gawk ];
    # Its output reaches `nomad alloc logs` through journald's console forwarding.
    # NOMAD_META_* come from the job's meta block, via /secrets/nomad.env.
    script = ''
      limit=''${NOMAD_META_limit:-200000}
      status=''${NOMAD_META_exit_code:-0}
      echo "batch: allocation ''${NOMAD_ALLOC_ID:-none}, counting primes below $limit"
      count=$(awk -v n="$limit" 'BEGIN {
        c = 0
        for (i = 2; i < n; i++) {
          p = 1
          for (j = 2; j * j <= i; j++) if (i % j == 0) { p = 0; break }
          c += p
        }
        print c
      }')
      echo "batch: $count primes below $limit; exiting with status $status"
      exit "$status"
    '';
  };
}

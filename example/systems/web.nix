# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# "web": nginx serving a page that names the Nomad allocation it runs in.
# Job: ../jobs/web.nomad.hcl. Build: nix build .#nixosConfigurations.web.config.system.build.toplevel
{ ... }:
{
  imports = [ ../modules/guest.nix ];

  nomad.guest.enable = true;
  # Also names the toplevel: /nix/store/...-nixos-system-web-<version>.
  networking.hostName = "web";
  system.stateVersion = "25.05";

  # nginx cannot put environment variables into a page, so a unit that reads
  # the task environment writes it at boot.
  nomad.guest.envFileServices = [ "web-page" ];
  # The job's template renders the greeting into secrets/greeting, and its
  # task config makes it the machine's credential "greeting".
  nomad.guest.credentials.web-page = [ "greeting" ];
  systemd.services.web-page = {
    description = "Write the page nginx serves";
    wantedBy = [ "multi-user.target" ];
    requiredBy = [ "nginx.service" ];
    before = [ "nginx.service" ];
    serviceConfig = {
      Type = "oneshot";
      # Keeps the unit active, and with it its RuntimeDirectory /run/web.
      RemainAfterExit = true;
      RuntimeDirectory = "web";
    };
    script = ''
      cat >/run/web/index.html <<EOF
      <!doctype html>
      <title>''${NOMAD_JOB_NAME:-web}</title>
      <p>Hello from NixOS in a systemd-nspawn machine.</p>
      <p>Allocation ''${NOMAD_ALLOC_ID:-none (not started by Nomad)}, task ''${NOMAD_TASK_NAME:-none}.</p>
      <p>$(cat "$CREDENTIALS_DIRECTORY/greeting")</p>
      EOF
      echo "web-page: wrote /run/web/index.html for allocation ''${NOMAD_ALLOC_ID:-none}"
    '';
  };

  services.nginx = {
    enable = true;
    virtualHosts.web = {
      default = true;
      root = "/run/web";
    };
  };

  networking.firewall.allowedTCPPorts = [ 80 ];
}

# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# The "web" system (example/systems/web.nix) as a Nomad service job.
#
# The toplevel must already be in the client's /nix/store. From the repository
# root, on a machine with Nix:
#   toplevel=$(nix build --no-link --print-out-paths .#nixosConfigurations.web.config.system.build.toplevel)
#   nix copy --to ssh://root@client "$toplevel"
#   nomad job run -var "toplevel=$toplevel" example/jobs/web.nomad.hcl
# (or push it to a binary cache the client uses and run `nix-store --realise "$toplevel"`
# there). The driver roots the closure while the allocation runs. To ship the closure with
# the job instead, see web-artifact.nomad.hcl.
#
# The page's greeting is a credential of the machine, from a Nomad variable the job reads:
#   nomad var put nomad/jobs/web greeting="Hello from a credential"
# Until the variable exists the template holds the task back.

variable "toplevel" {
  type        = string
  description = "Store path of the web system, e.g. /nix/store/<hash>-nixos-system-web-25.05.<date>.<rev>"
}

job "web" {
  type = "service"

  group "web" {
    network {
      port "http" {
        to = 80
      }
    }

    task "web" {
      driver = "nixos-nspawn"

      config {
        toplevel      = var.toplevel
        ready_timeout = "2m"
        ports         = ["http"]
        # secrets/greeting becomes the machine's credential "greeting",
        # which web-page.service takes with LoadCredential=greeting.
        credentials = {
          greeting = "secrets/greeting"
        }
      }

      # Only root of the host reads the rendered file (the machine sees it
      # as nobody's); the guest service gets the credential. A new value
      # restarts the task, and the new machine has the new credential.
      template {
        destination = "secrets/greeting"
        perms       = "0600"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/web\" }}{{ .greeting }}{{ end }}"
      }

      # Room for the guest's orderly shutdown (systemd stops nginx and the
      # rest) before what is left is killed; Nomad's default is 5s. The
      # client caps it at its max_kill_timeout (30s by default).
      kill_timeout = "30s"

      resources {
        cpu    = 200
        memory = 256
      }

      # nginx listens on port 80 of the machine's own address, which the
      # driver assigns and reports to Nomad: address_mode = "driver"
      # registers that address. The "http" port of the group is also
      # forwarded from every address of the client to the machine's port 80.
      service {
        name         = "web"
        provider     = "nomad"
        port         = 80
        address_mode = "driver"
      }
    }
  }
}

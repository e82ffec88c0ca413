# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# The "batch" system (example/systems/batch.nix) as a Nomad batch job: the
# machine ends when its batch.service does, and the task's exit code is that
# service's exit status.
#
# The toplevel must already be in the client's /nix/store. From the repository
# root, on a machine with Nix:
#   toplevel=$(nix build --no-link --print-out-paths .#nixosConfigurations.batch.config.system.build.toplevel)
#   nix copy --to ssh://root@client "$toplevel"
#   nomad job run -var "toplevel=$toplevel" example/jobs/batch.nomad.hcl
#   nomad job run -var "toplevel=$toplevel" -var exit_code=3 example/jobs/batch.nomad.hcl   # a failing run
# (or push it to a binary cache the client uses and run `nix-store --realise "$toplevel"`
# there). The driver roots the closure while the allocation runs. To ship the closure with
# the job instead, see web-artifact.nomad.hcl.

variable "toplevel" {
  type        = string
  description = "Store path of the batch system, e.g. /nix/store/<hash>-nixos-system-batch-25.05.<date>.<rev>"
}

variable "exit_code" {
  type        = string
  default     = "0"
  description = "The status batch.service exits with, to see it come back as the task's exit code."
}

job "batch" {
  type = "batch"

  group "batch" {
    # One run: a failure stays failed, with its exit code in `nomad alloc status`.
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "batch" {
      driver = "nixos-nspawn"

      config {
        toplevel = var.toplevel
      }

      # The guest reads these as NOMAD_META_limit and NOMAD_META_exit_code
      # from /secrets/nomad.env.
      meta {
        limit     = "200000"
        exit_code = var.exit_code
      }

      # Room for an orderly shutdown when the job is stopped mid-run.
      kill_timeout = "30s"

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}

# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# A batch task that boots the tiny fixture, prints a line and exits 0.
#   nomad job run -var toplevel=$NIXOS_NSPAWN_TINY_TOPLEVEL tiny-batch.nomad.hcl
# Expect: alloc "complete", task exit code 0, `nomad alloc logs` has hello-from-nomad.

variable "toplevel" {
  type        = string
  description = "store path of the tiny fixture (NIXOS_NSPAWN_TINY_TOPLEVEL)"
}

job "e2e-tiny-batch" {
  type = "batch"

  group "tiny" {
    # One attempt: a failure must show, not be retried away.
    restart {
      attempts = 0
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "hello" {
      driver = "nixos-nspawn"

      config {
        toplevel  = var.toplevel
        init_args = ["print=hello-from-nomad", "exit=0"]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}

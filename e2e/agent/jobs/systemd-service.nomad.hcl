# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# A service task that boots the systemd fixture (Debian systemd as PID 1 with
# longrun.service) and runs until stopped.
#   nomad job run -var toplevel=$NIXOS_NSPAWN_SYSTEMD_TOPLEVEL systemd-service.nomad.hcl
# Expect: alloc running, non-zero memory in `nomad alloc status -stats`,
# `nomad alloc exec -task guest <alloc> /bin/cat /proc/1/comm` prints systemd,
# and `nomad job stop -purge` ends the task with exit code 0.

variable "toplevel" {
  type        = string
  description = "store path of the systemd fixture (NIXOS_NSPAWN_SYSTEMD_TOPLEVEL)"
}

job "e2e-systemd-service" {
  type = "service"

  group "systemd" {
    restart {
      attempts = 0
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }
    # Short deployment timers: the guest is ready in well under a second.
    update {
      min_healthy_time  = "2s"
      healthy_deadline  = "1m"
      progress_deadline = "2m"
    }

    task "guest" {
      driver = "nixos-nspawn"

      config {
        toplevel = var.toplevel
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

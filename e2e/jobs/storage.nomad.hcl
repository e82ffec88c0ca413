# A machine with what Nomad gives it besides its directories: a credential rendered by a
# template from a Nomad variable. The tests register it under IDs of their own.
variable "toplevel" {
  type = string
}

# The Nomad variable the template reads: nomad/jobs/<the job's ID>, which the task's workload
# identity may read.
variable "var_path" {
  type = string
}

variable "change_mode" {
  type    = string
  default = "restart"
}

job "storage" {
  type = "service"
  group "g" {
    restart {
      attempts = 3
      delay    = "1s"
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }
    task "t" {
      driver = "nixos-nspawn"
      config {
        toplevel = var.toplevel
        credentials = {
          db-password = "secrets/db-password"
        }
      }
      template {
        destination   = "secrets/db-password"
        perms         = "0600"
        change_mode   = var.change_mode
        change_signal = "SIGUSR2"
        data          = "{{ with nomadVar \"${var.var_path}\" }}{{ .password }}{{ end }}"
      }
      kill_timeout = "20s"
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

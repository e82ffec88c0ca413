# A machine with what Nomad gives it besides its directories: a credential rendered by a template
# from a Nomad variable (var_path), a host volume (volume), or both. The tests register it under
# IDs of their own.
variable "toplevel" {
  type = string
}

# The Nomad variable the template reads: nomad/jobs/<the job's ID>, which the task's workload
# identity may read. Empty: the credential holds "none".
variable "var_path" {
  type    = string
  default = ""
}

variable "change_mode" {
  type    = string
  default = "restart"
}

# A host volume's name. Empty: no volume.
variable "volume" {
  type    = string
  default = ""
}

variable "destination" {
  type    = string
  default = "/var/lib/app"
}

variable "read_only" {
  type    = bool
  default = false
}

job "storage" {
  type = "service"
  group "g" {
    restart {
      attempts = var.var_path == "" ? 0 : 3
      delay    = "1s"
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }
    dynamic "volume" {
      for_each = var.volume == "" ? [] : [var.volume]
      labels   = ["data"]
      content {
        type            = "host"
        source          = volume.value
        read_only       = var.read_only
        access_mode     = var.read_only ? "single-node-reader-only" : "single-node-writer"
        attachment_mode = "file-system"
      }
    }
    task "t" {
      driver = "nixos-nspawn"
      config {
        toplevel    = var.toplevel
        credentials = {
          db-password = "secrets/db-password"
        }
      }
      template {
        destination   = "secrets/db-password"
        perms         = "0600"
        change_mode   = var.change_mode
        change_signal = "SIGUSR2"
        data          = var.var_path == "" ? "none" : "{{ with nomadVar \"${var.var_path}\" }}{{ .password }}{{ end }}"
      }
      dynamic "volume_mount" {
        for_each = var.volume == "" ? [] : ["data"]
        content {
          volume      = volume_mount.value
          destination = var.destination
          read_only   = var.read_only
        }
      }
      kill_timeout = "20s"
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

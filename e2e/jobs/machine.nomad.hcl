# One machine of the driver, a single task "t" that Nomad neither restarts nor reschedules
# unless asked: what most e2e tests run. The tests register it under IDs of their own, and the
# variables' defaults are Nomad's and the driver's own.
variable "toplevel" {
  type = string
}

variable "type" {
  type    = string
  default = "batch"
}

variable "init_args" {
  type    = list(string)
  default = []
}

variable "store_view" {
  type    = string
  default = "closure"
}

variable "restart_attempts" {
  type    = number
  default = 0
}

variable "kill_signal" {
  type    = string
  default = "SIGINT"
}

variable "kill_timeout" {
  type    = string
  default = "5s"
}

# Nomad's log rotation (sizes in MB); the console tests raise the size so one file holds all
# they print, with fewer files to stay within the allocation's disk.
variable "log_files" {
  type    = number
  default = 10
}

variable "log_file_size" {
  type    = number
  default = 10
}

job "machine" {
  type = var.type
  group "g" {
    restart {
      attempts = var.restart_attempts
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
        toplevel   = var.toplevel
        init_args  = var.init_args
        store_view = var.store_view
      }
      kill_signal  = var.kill_signal
      kill_timeout = var.kill_timeout
      logs {
        max_files     = var.log_files
        max_file_size = var.log_file_size
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

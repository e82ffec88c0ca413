# One machine of the driver, a single task "t" that Nomad neither restarts nor reschedules
# unless asked: what most e2e tests run. The tests register it under IDs of their own.
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

variable "restart_attempts" {
  type    = number
  default = 0
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
        toplevel  = var.toplevel
        init_args = var.init_args
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

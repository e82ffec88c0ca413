# A service machine stopped with SIGUSR1 (tinyinit reports it and ignores it) and killed after
# kill_timeout.
variable "toplevel" {
  type = string
}

job "kill-signal" {
  type = "service"
  group "g" {
    restart {
      attempts = 0
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
      }
      kill_signal  = "SIGUSR1"
      kill_timeout = "3s"
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

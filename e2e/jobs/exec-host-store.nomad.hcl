# A tiny service machine that sees the host's whole store (store_view = "host"), for exec into
# a guest without a shell of its own.
variable "toplevel" {
  type = string
}

job "exec-host-store" {
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
        toplevel   = var.toplevel
        store_view = "host"
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

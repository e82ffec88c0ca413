# A service machine with a task named "web", for the web UI's allocation and task pages.
variable "toplevel" {
  type = string
}

job "ui" {
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
    task "web" {
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

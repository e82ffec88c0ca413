# A service machine with a group port mapped to the guest's 8080 and a Nomad service that
# registers the machine's own address (address_mode = "driver").
variable "toplevel" {
  type = string
}

job "network" {
  type = "service"
  group "g" {
    network {
      port "http" {
        to = 8080
      }
    }
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
        ports    = ["http"]
      }
      service {
        name         = "e2e-net-web"
        provider     = "nomad"
        port         = "http"
        address_mode = "driver"
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

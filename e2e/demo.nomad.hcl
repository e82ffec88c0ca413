# The demo job of `make demo`: @toplevel@ is replaced by the systemd fixture's store path.
job "nixos-demo" {
  type = "service"

  group "web" {
    # The guest's web service listens on 8080; the driver forwards the "http" port of the host
    # to it.
    network {
      port "http" {
        to = 8080
      }
    }

    task "web" {
      driver = "nixos-nspawn"

      config {
        toplevel      = "@toplevel@"
        ready_timeout = "2m"
        ports         = ["http"]
      }

      # Registered with the machine's own address, which the driver reports to Nomad.
      service {
        name         = "nixos-demo-web"
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

# The demo job of `make demo`: @toplevel@ is replaced by the systemd fixture's store path.
job "nixos-demo" {
  type = "service"

  group "web" {
    task "web" {
      driver = "nixos-nspawn"

      config {
        toplevel      = "@toplevel@"
        ready_timeout = "2m"
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

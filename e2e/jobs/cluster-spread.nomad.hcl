# Four tiny service machines spread over the cluster's clients.
variable "toplevel" {
  type = string
}

job "cluster-spread" {
  type = "service"
  group "g" {
    count = 4
    spread {
      attribute = "${node.unique.id}"
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
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

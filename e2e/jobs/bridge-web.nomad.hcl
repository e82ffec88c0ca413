# One machine whose web.service answers on 8080, reached through the group port "http": in a
# bridge-mode group (mode = "bridge", Nomad's port mapping) or in host mode (mode = "host", the
# driver's veth and its port forward). TestBridgeCycles and BenchmarkJobRunToAnswer run it.
variable "toplevel" {
  type = string
}

variable "mode" {
  type = string
}

# A network_mode for the task; "" leaves it to the group's mode (refusal tests set one).
variable "network_mode" {
  type    = string
  default = ""
}

job "bridge-web" {
  type = "service"
  group "g" {
    network {
      mode = var.mode
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
    task "web" {
      driver       = "nixos-nspawn"
      kill_timeout = "60s"
      config {
        toplevel = var.toplevel
        # network_mode and ports belong to host-mode groups only.
        network_mode = var.network_mode != "" ? var.network_mode : (var.mode == "host" ? "veth" : null)
        ports        = var.mode == "host" ? ["http"] : null
      }
      resources {
        cpu    = 100
        memory = 256
      }
    }
  }
}

# Two machines on one client: "reserved" reserves a core of its own, "shared" runs on the cores
# Nomad shares between tasks (TestCgroupV2AgentCores, in the cgroup v2 VM host).
variable "toplevel" {
  type = string
}

job "cores" {
  type = "service"
  group "reserved" {
    task "reserved" {
      driver = "nixos-nspawn"
      config {
        toplevel = var.toplevel
      }
      resources {
        cores  = 1
        memory = 64
      }
    }
  }
  group "shared" {
    task "shared" {
      driver = "nixos-nspawn"
      config {
        toplevel = var.toplevel
      }
      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}

# A machine with a Nomad host volume mounted where its service keeps its data. The tests register
# it under IDs of their own.
variable "toplevel" {
  type = string
}

variable "volume" {
  type = string
}

variable "destination" {
  type    = string
  default = "/var/lib/app"
}

variable "read_only" {
  type    = bool
  default = false
}

job "volume" {
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
    volume "data" {
      type            = "host"
      source          = var.volume
      read_only       = var.read_only
      access_mode     = var.read_only ? "single-node-reader-only" : "single-node-writer"
      attachment_mode = "file-system"
    }
    task "t" {
      driver = "nixos-nspawn"
      config {
        toplevel = var.toplevel
      }
      volume_mount {
        volume      = "data"
        destination = var.destination
        read_only   = var.read_only
      }
      kill_timeout = "20s"
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

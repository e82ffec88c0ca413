# A batch machine whose closure is a binary cache that Nomad's artifact fetcher unpacks into
# local/closure; the guest lists its store and exits.
variable "toplevel" {
  type = string
}

variable "source" {
  type = string
}

job "closure" {
  type = "batch"
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
        toplevel     = var.toplevel
        binary_cache = "local/closure"
        init_args    = ["store", "exit=0"]
      }
      artifact {
        source      = var.source
        destination = "local/closure"
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

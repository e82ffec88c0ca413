# A batch machine whose closure is a nix-store --export stream that Nomad's artifact fetcher
# puts into local/closure (the driver refuses it: export streams carry no signatures).
variable "toplevel" {
  type = string
}

variable "source" {
  type = string
}

job "closure-export" {
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
        toplevel  = var.toplevel
        export    = "local/closure/cached.export"
        init_args = ["store", "exit=0"]
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

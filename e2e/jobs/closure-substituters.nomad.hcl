# A batch machine whose closure comes from binary caches the plugin config lists (S3, a token
# cache, several with priorities); the guest lists its store and exits.
variable "toplevel" {
  type = string
}

variable "substituters" {
  type = list(string)
}

job "closure-substituters" {
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
        substituters = var.substituters
        init_args    = ["store", "exit=0"]
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

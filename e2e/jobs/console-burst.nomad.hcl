# The guest prints a million numbered lines at once, then "tinyinit: burst done", and exits.
# About 20 MB: one log file holds it all, so rotation removes nothing.
variable "toplevel" {
  type = string
}

job "console-burst" {
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
        init_args = ["lines=1000000", "print=tinyinit: burst done", "exit=0"]
      }
      logs {
        max_files     = 2
        max_file_size = 100
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

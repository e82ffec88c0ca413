# Init args and an environment value with the characters that shells, HCL and Nomad treat
# specially. Nomad evaluates the strings of a task's config as HCL templates twice (when the job
# is parsed and again on the client), so a literal "${" takes "$$${"; "$$", "%" and "\\" (a
# backslash) pass as HCL writes them. e2e/contract_test.go says what the guest must print.
variable "toplevel" {
  type = string
}

job "args-bytes" {
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
        toplevel = var.toplevel
        init_args = [
          "print=<0>$X",
          "print=<1>$$${X}",
          "print=<2>D:$$",
          "print=<3>%n",
          "print=<4>%%",
          "print=<5>end\\",
          "print=<6>$(touch /tmp/x)",
          "print=<7>$PATH",
          "env=SECRET",
          "exit=0",
        ]
      }
      env {
        SECRET = "pa$$word"
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

# A bridge-mode group (Nomad makes its network namespace with the CNI bridge plugins) of two
# machines and a raw_exec task, all in that one namespace (TestBridge, in the VM host):
#   web   the systemd fixture, whose web.service answers on 8080: mapped to the host as "http"
#   peer  the same, with web.service masked; the test starts a server on port 80 in it
#   side  raw_exec: a busybox httpd on 9090, and a loop that fetches web's page over 127.0.0.1
variable "toplevel" {
  type = string
}

variable "busybox" {
  type = string
}

job "bridge" {
  type = "service"
  group "g" {
    network {
      mode = "bridge"
      port "http" {
        to = 8080
      }
      port "http80" {
        to = 80
      }
      dns {
        servers  = ["192.0.2.53"]
        searches = ["bridge.example"]
        options  = ["ndots:2"]
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
    service {
      name         = "bridge-web-alloc"
      provider     = "nomad"
      port         = "http"
      address_mode = "alloc"
    }
    service {
      name         = "bridge-web-host"
      provider     = "nomad"
      port         = "http"
      address_mode = "host"
    }
    task "web" {
      driver       = "nixos-nspawn"
      kill_timeout = "60s"
      config {
        toplevel = var.toplevel
      }
      resources {
        cpu    = 100
        memory = 256
      }
    }
    task "peer" {
      driver       = "nixos-nspawn"
      kill_timeout = "60s"
      config {
        toplevel  = var.toplevel
        init_args = ["systemd.mask=web.service"]
      }
      resources {
        cpu    = 100
        memory = 256
      }
    }
    task "side" {
      driver = "raw_exec"
      config {
        command = "/bin/bash"
        args = ["-c", <<-EOT
          mkdir -p local/www && echo "hello from raw_exec" >local/www/index.html
          ${var.busybox} httpd -p 127.0.0.1:9090 -h local/www
          while :; do
            page=$(timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080 && printf "GET / HTTP/1.0\r\n\r\n" >&3 && tail -n 1 <&3' 2>&1)
            echo "side got: $page"
            sleep 2
          done
        EOT
        ]
      }
      resources {
        cpu    = 50
        memory = 64
      }
    }
  }
}

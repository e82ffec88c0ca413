# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# The "web" system delivered as a task artifact: a signed binary cache, archived.
# Clients need neither Nix nor the closure beforehand. From the repository root:
#   toplevel=$(nix build --no-link --print-out-paths .#nixosConfigurations.web.config.system.build.toplevel)
#   nix key generate-secret --key-name ci.example.org-1 > ci.sec   # once; the public key
#   nix key convert-secret-to-public < ci.sec                       # goes into trusted_public_keys
#   nix copy --to "file://$PWD/cache?compression=zstd&secret-key=$PWD/ci.sec" "$toplevel"
#   tar -C cache -czf web-closure.tar.gz .       # upload it where clients can fetch it
#   nomad job run -var "toplevel=$toplevel" -var closure_url=https://artifacts.example.org/web-closure.tar.gz \
#     example/jobs/web-artifact.nomad.hcl
# The driver checks every path's signature and hashes, imports the closure into the client's Nix
# store (or its own store on hosts without Nix) and roots it while the allocation runs.

variable "toplevel" {
  type        = string
  description = "Store path of the web system, e.g. /nix/store/<hash>-nixos-system-web-25.05.<date>.<rev>"
}

variable "closure_url" {
  type        = string
  description = "Where the archived binary cache holding the closure is, for Nomad's artifact fetcher"
}

job "web-artifact" {
  type = "service"

  group "web" {
    task "web" {
      driver = "nixos-nspawn"

      artifact {
        source      = var.closure_url
        destination = "local/closure"
      }

      config {
        toplevel     = var.toplevel
        binary_cache = "local/closure"
      }

      kill_timeout = "30s"

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}

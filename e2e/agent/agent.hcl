# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# Configuration of the e2e Nomad agent, a single-node server and client that e2e/agent/agent.sh
# runs inside the test host with `nomad agent -server -client -bootstrap-expect=1 -bind=127.0.0.1
# -config=<this file>`.
# plugin_dir and data_dir depend on the checkout and are given by agent.sh as
# -plugin-dir=<repo>/build/plugins and -data-dir=/var/lib/nomad-e2e.
#
# The plugin and telemetry blocks below are copied verbatim from README.md
# ("Agent configuration"); a test compares them, so change both together.

# Nomad refuses to guess an advertise address on loopback.
advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}

plugin "nomad-driver-nixos" {
  config {
    enabled  = true
    data_dir = "/var/lib/nomad-driver-nixos"
    # NixOS's Nomad unit has no systemd-nspawn in PATH; the driver also looks in
    # /run/current-system/sw/bin, or give absolute paths:
    # nspawn_path      = "/run/current-system/sw/bin/systemd-nspawn"
    # systemd_run_path = "/run/current-system/sw/bin/systemd-run"
    # nsenter_path     = "/run/current-system/sw/bin/nsenter"
    slice     = "machine.slice"
    tasks_max = 16384
    # Closures go into the host's Nix store when it is writable, else into a store
    # under data_dir ("auto"); "host" or "driver" forces one.
    store = "auto"
    # Fetched closures must be signed by one of these keys (nix.conf's format):
    # trusted_public_keys = ["cache.example.org-1:<base64 public key>"]
    # substituters        = ["https://cache.example.org"]
  }
}

# Without this Nomad asks drivers for no stats at all.
telemetry {
  publish_allocation_metrics = true
  collection_interval        = "1s"
}

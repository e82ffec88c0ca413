# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# A client of the e2e cluster: e2e/cluster/cluster.sh runs it on the test hosts nxcl-client1 and
# nxcl-client2 with `nomad agent -config=<this file> -bind=<its private address>
# -network-interface=eth0 -servers=<server address>:4647 -node=<host name>
# -plugin-dir=<repo>/build/cluster/plugins -data-dir=/var/lib/nomad-cluster`.
#
# The plugin and telemetry blocks below are copied verbatim from README.md
# ("Agent configuration"), as in e2e/agent/agent.hcl; TestClusterClientConfig compares them.

client {
  enabled = true
  options {
    # No cloud here: the AWS probe alone waits 2 s for its metadata service before giving up.
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}

# The private network has no route out; do not even try.
disable_update_check = true

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

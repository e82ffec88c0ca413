# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# The server of the e2e cluster: e2e/cluster/cluster.sh runs it on the test host nxcl-server with
# `nomad agent -config=<this file> -bind=<its private address> -node=nxcl-server
# -data-dir=/var/lib/nomad-cluster`. It runs no client: the two client hosts do the work.

server {
  enabled          = true
  bootstrap_expect = 1
}

# The private network has no route out; do not even try.
disable_update_check = true

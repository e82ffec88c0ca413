#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# setup.sh: what the browser checks of the Nomad UI need, installed idempotently and quietly:
# Debian's Chromium (/usr/bin/chromium, with fonts for readable screenshots) and playwright-core
# at the version pinned in package-lock.json. No browser is ever downloaded by Playwright: the
# scripts drive /usr/bin/chromium. Run as root (apt-get).
set -euo pipefail

UI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHROMIUM=/usr/bin/chromium
# Fonts: a headless Chromium without any draws text as empty boxes.
PACKAGES=(chromium fonts-liberation fonts-dejavu-core)
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

log() { echo "ui-setup: $*" >&2; }
die() { log "error: $*"; exit 1; }

missing=()
for p in "${PACKAGES[@]}"; do
	dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
if ((${#missing[@]} > 0)); then
	log "installing ${missing[*]} with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	# A new machine may have stale or no package lists.
	apt-get update -qq >/dev/null
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[[ -x $CHROMIUM ]] || die "$CHROMIUM is missing after installing chromium"

command -v node >/dev/null || die "node is not installed (playwright-core needs Node.js 20 or newer)"
node_major=$(node -p 'process.versions.node.split(".")[0]')
((node_major >= 20)) || die "node $(node --version) is too old: playwright-core needs Node.js 20 or newer"

# npm ci only when node_modules does not hold exactly what the lock file pins.
want=$(node -p 'require(process.argv[1]).packages["node_modules/playwright-core"].version' "$UI_DIR/package-lock.json")
have=$(node -p 'try { require(process.argv[1]).version } catch { "" }' "$UI_DIR/node_modules/playwright-core/package.json")
if [[ $have != "$want" ]]; then
	log "npm ci (playwright-core $want)"
	# npm trusts only the CAs built into Node unless told otherwise; the machine's own trust store
	# is what holds a site's proxy or registry CA (ca-certificates is on every Debian machine).
	cafile=()
	[[ -f $CA_BUNDLE ]] && cafile=(--cafile="$CA_BUNDLE")
	(cd "$UI_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci "${cafile[@]}" --no-audit --no-fund --loglevel=error >/dev/null)
fi

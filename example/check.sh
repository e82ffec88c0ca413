#!/usr/bin/env bash
# This Source Code Form is subject to the terms of the Mozilla Public
# License, v. 2.0. If a copy of the MPL was not distributed with this
# file, You can obtain one at https://mozilla.org/MPL/2.0/.
#
# check.sh: parse every .nix file of the repository with `nix-instantiate
# --parse` and stop at the first that fails. That checks syntax and unbound
# variables only: nothing is evaluated against nixpkgs, nothing is built.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if ! command -v nix-instantiate >/dev/null; then
	echo "check.sh: nix-instantiate not found (Debian: apt-get install nix-bin)" >&2
	exit 1
fi

n=0
while IFS= read -r -d '' f; do
	if ! nix-instantiate --parse "$f" >/dev/null; then
		echo "check.sh: FAIL ${f#"$root"/}" >&2
		exit 1
	fi
	echo "ok ${f#"$root"/}"
	n=$((n + 1))
done < <(find "$root" -name .git -prune -o -type f -name '*.nix' -print0 | sort -z)

if [ "$n" -eq 0 ]; then
	echo "check.sh: no .nix files under $root" >&2
	exit 1
fi
echo "check.sh: all $n .nix files parse"

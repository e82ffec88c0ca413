// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"testing"

	"github.com/nomad-nixos/nomad-driver-nixos/closure"
	"github.com/shoenig/test/must"
)

func TestCheckTaskSubstituters(t *testing.T) {
	urls := func(raws ...string) []closure.CacheURL {
		parsed, err := closure.ParseCacheURLs("substituters", raws)
		must.NoError(t, err)
		return parsed
	}
	pc := PluginConfig{substituters: urls("https://cache.example.org/"), trustedSubstituters: urls("https://ci.example.org/nix")}
	must.NoError(t, checkTaskSubstituters(nil, pc))
	must.NoError(t, checkTaskSubstituters(urls("https://cache.example.org", "https://ci.example.org/nix/"), pc))
	err := checkTaskSubstituters(urls("https://ci.example.org/nix", "http://10.0.0.1/"), pc)
	must.ErrorContains(t, err, `substituters[1] = "http://10.0.0.1/": a task may name only binary caches of the plugin config's substituters or trusted_substituters`)
}

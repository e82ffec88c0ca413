// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"testing"

	"github.com/nomad-nixos/nomad-driver-nixos/closure"
	"github.com/shoenig/test/must"
)

func TestTaskCaches(t *testing.T) {
	urls := func(raws ...string) []closure.CacheURL {
		parsed, err := closure.ParseCacheURLs("substituters", raws)
		must.NoError(t, err)
		return parsed
	}
	names := func(us []closure.CacheURL) []string {
		var s []string
		for _, u := range us {
			s = append(s, u.String())
		}
		return s
	}
	pc := PluginConfig{
		substituters:        urls("https://cache.example.org/", "s3://nix?region=eu-west-1&priority=20"),
		trustedSubstituters: urls("https://ci.example.org/nix?priority=5&trusted=1"),
	}
	got, err := taskCaches(nil, pc)
	must.NoError(t, err)
	must.Eq(t, []string{"https://cache.example.org", "s3://nix?priority=20&region=eu-west-1"}, names(got))

	// A task names a cache by its place; the operator's priority and trust come with it.
	got, err = taskCaches(urls("https://ci.example.org/nix/", "https://cache.example.org", "s3://nix?region=eu-west-1"), pc)
	must.NoError(t, err)
	must.Eq(t, []string{"https://ci.example.org/nix?priority=5&trusted=1", "https://cache.example.org", "s3://nix?priority=20&region=eu-west-1"}, names(got))
	must.True(t, got[0].Params().Trusted)

	_, err = taskCaches(urls("https://ci.example.org/nix", "http://10.0.0.1/"), pc)
	must.ErrorContains(t, err, `substituters[1] = "http://10.0.0.1/": a task may name only binary caches of the plugin config's substituters or trusted_substituters`)
	_, err = taskCaches(urls("https://cache.example.org?trusted=1"), pc)
	must.ErrorContains(t, err, `substituters[0] = "https://cache.example.org?trusted=1": priority, want-mass-query and trusted are the plugin config's to set; name the cache as "https://cache.example.org"`)
	// Another region is another bucket.
	_, err = taskCaches(urls("s3://nix?region=us-east-1"), pc)
	must.ErrorContains(t, err, "a task may name only binary caches")
}

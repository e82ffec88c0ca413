// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// Samples fall on the multiples of the interval, whenever a task's stream began.
func TestUntilNextSample(t *testing.T) {
	base := time.Unix(1796520000, 0)
	for _, tc := range []struct {
		now      time.Time
		interval time.Duration
		want     time.Duration
	}{
		{base, time.Second, time.Second},
		{base.Add(300 * time.Millisecond), time.Second, 700 * time.Millisecond},
		{base.Add(999 * time.Millisecond), time.Second, time.Millisecond},
		{base.Add(7 * time.Second), 5 * time.Second, 3 * time.Second},
	} {
		must.EqOp(t, tc.want, untilNextSample(tc.now, tc.interval), must.Sprintf("%s at %s", tc.interval, tc.now))
	}
}

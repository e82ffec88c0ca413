// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/cgroupfs"
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

// All streams of an interval are sampled in one round; a reader that takes nothing holds up no
// one and finds the newest sample; a removed stream is closed, and a round with none left ends.
func TestStatsRounds(t *testing.T) {
	h := &taskHandle{
		logger:     hclog.NewNullLogger(),
		cgroups:    cgroupfs.Cgroups{Base: "../cgroupfs/testdata/cgroupv2", Mode: cgroupfs.CgroupUnified},
		cgroupPath: "/machine.slice/nomad-3f2504e0-web.service",
	}
	stream := func() *statsStream {
		var c cpustats.Compute
		return &statsStream{h: h, ch: make(chan *drivers.TaskResourceUsage, 1), total: cpustats.New(c), user: cpustats.New(c), system: cpustats.New(c)}
	}
	const interval = 20 * time.Millisecond
	var r statsRounds
	reader, idle := stream(), stream()
	r.add(reader, interval)
	r.add(idle, interval)
	first := <-idle.ch
	must.EqOp(t, 169308160, first.ResourceUsage.MemoryStats.Usage)
	var stamps []int64
	for range 5 {
		u := <-reader.ch
		if len(stamps) > 0 {
			must.Greater(t, stamps[len(stamps)-1], u.Timestamp)
		}
		stamps = append(stamps, u.Timestamp)
	}
	// The idle stream holds the sample of the reader's last round or of the one before (a
	// round samples its streams in no set order), so it is newer than the reader's third.
	newest := <-idle.ch
	must.Greater(t, first.Timestamp, newest.Timestamp)
	must.Greater(t, stamps[2], newest.Timestamp)

	r.remove(reader, interval)
	r.remove(idle, interval)
	_, open := <-reader.ch
	must.False(t, open)
	for {
		r.mu.Lock()
		_, running := r.rounds[interval]
		r.mu.Unlock()
		if !running {
			break
		}
		time.Sleep(interval)
	}
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/nomad-nixos/nomad-driver-nixos/cgroupfs"
)

// Measured names Nomad knows; it drops any other.
var (
	memoryMeasured = []string{"RSS", "Cache", "Usage"}
	cpuMeasured    = []string{"System Mode", "User Mode", "Total Ticks", "Throttled Periods", "Throttled Time", "Percent"}
)

// TaskStats samples the machine's unit cgroup: first at once, then at each multiple of
// interval (since the epoch), until the machine ends or ctx does. A reader that has not taken a
// sample when the next is taken gets the newer one.
func (d *Driver) TaskStats(ctx context.Context, taskID string, interval time.Duration) (<-chan *drivers.TaskResourceUsage, error) {
	h, ok := d.tasks.get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	if interval <= 0 {
		return nil, fmt.Errorf("stats interval %s: it must be positive (Nomad's client collection_interval)", interval)
	}
	d.mu.RLock()
	compute := d.compute
	d.mu.RUnlock()
	s := &statsStream{
		h:     h,
		ch:    make(chan *drivers.TaskResourceUsage, 1),
		total: cpustats.New(compute), user: cpustats.New(compute), system: cpustats.New(compute),
	}
	d.stats.add(s, interval)
	go func() {
		select {
		case <-ctx.Done():
		case <-h.doneCh:
		}
		d.stats.remove(s, interval)
	}()
	return s.ch, nil
}

// statsRounds samples the streams of all tasks at one interval together, one after another on
// one goroutine. Nomad asks for every task's stats at one interval, so the plugin wakes once an
// interval, not once for each task, and the Go scheduler has no other goroutines to run beside
// a cgroup read, so it has no reason to hand the reader's processor to another thread.
type statsRounds struct {
	mu     sync.Mutex
	rounds map[time.Duration]map[*statsStream]struct{}
}

// statsStream is the stream of one TaskStats call.
type statsStream struct {
	h                   *taskHandle
	ch                  chan *drivers.TaskResourceUsage
	sampler             *cgroupfs.Sampler
	total, user, system *cpustats.Tracker
}

// add takes the stream's first sample and makes it one of interval's round.
func (r *statsRounds) add(s *statsStream, interval time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if u := s.take(); u != nil {
		s.deliver(u)
	}
	if r.rounds == nil {
		r.rounds = map[time.Duration]map[*statsStream]struct{}{}
	}
	streams, ok := r.rounds[interval]
	if !ok {
		streams = map[*statsStream]struct{}{}
		r.rounds[interval] = streams
		go r.run(interval)
	}
	streams[s] = struct{}{}
}

// remove ends the stream.
func (r *statsRounds) remove(s *statsStream, interval time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.rounds[interval], s)
	close(s.ch)
	if s.sampler != nil {
		s.sampler.Close()
	}
}

// run samples interval's streams at each multiple of it, until none is left. It takes all
// samples before it hands any out, so the readers (Nomad's gRPC streams) run in one burst after
// the cgroup reads, not once between every two of them.
func (r *statsRounds) run(interval time.Duration) {
	timer := time.NewTimer(untilNextSample(time.Now(), interval))
	defer timer.Stop()
	var round []taken
	for range timer.C {
		r.mu.Lock()
		streams := r.rounds[interval]
		if len(streams) == 0 {
			delete(r.rounds, interval)
			r.mu.Unlock()
			return
		}
		round = round[:0]
		for s := range streams {
			if u := s.take(); u != nil {
				round = append(round, taken{s, u})
			}
		}
		for _, t := range round {
			t.s.deliver(t.u)
		}
		clear(round)
		r.mu.Unlock()
		timer.Reset(untilNextSample(time.Now(), interval))
	}
}

// taken is a stream's sample of a round, not yet handed out.
type taken struct {
	s *statsStream
	u *drivers.TaskResourceUsage
}

// take reads the machine's cgroup, once the machine has one.
func (s *statsStream) take() *drivers.TaskResourceUsage {
	s.h.mu.RLock()
	cg := s.h.cgroupPath
	s.h.mu.RUnlock()
	if cg == "" {
		return nil
	}
	if s.sampler == nil {
		s.sampler = s.h.cgroups.Sampler(cg)
	}
	u, err := s.sampler.Read()
	if err != nil {
		if !cgroupfs.IsGone(err) {
			s.h.logger.Debug("reading machine cgroup", "error", err)
		}
		return nil
	}
	return usage(u, s.total, s.user, s.system)
}

// deliver hands a sample to the reader, in place of one it has not taken.
func (s *statsStream) deliver(next *drivers.TaskResourceUsage) {
	select {
	case s.ch <- next:
	default:
		// Only this round sends, so once the old sample is out the send cannot block.
		select {
		case <-s.ch:
		default:
		}
		s.ch <- next
	}
}

// untilNextSample is the time from now to the next multiple of interval since the epoch.
func untilNextSample(now time.Time, interval time.Duration) time.Duration {
	return interval - time.Duration(now.UnixNano()%int64(interval))
}

func usage(u cgroupfs.Usage, total, user, system *cpustats.Tracker) *drivers.TaskResourceUsage {
	percent := total.Percent(float64(u.CPUTotal.Nanoseconds()))
	mem := &drivers.MemoryStats{
		RSS:      u.MemoryRSS,
		Cache:    u.MemoryCache,
		Usage:    u.MemoryUsage,
		Measured: memoryMeasured,
	}
	if u.HasSwap {
		mem.Swap = u.MemorySwap
		mem.Measured = append(mem.Measured, "Swap")
	}
	if u.HasMaxUsage {
		mem.MaxUsage = u.MemoryMaxUsage
		mem.Measured = append(mem.Measured, "Max Usage")
	}
	return &drivers.TaskResourceUsage{
		ResourceUsage: &drivers.ResourceUsage{
			MemoryStats: mem,
			CpuStats: &drivers.CpuStats{
				SystemMode:       system.Percent(float64(u.CPUSystem.Nanoseconds())),
				UserMode:         user.Percent(float64(u.CPUUser.Nanoseconds())),
				Percent:          percent,
				TotalTicks:       total.TicksConsumed(percent),
				ThrottledPeriods: u.ThrottledPeriods,
				ThrottledTime:    uint64(u.ThrottledTime.Nanoseconds()),
				Measured:         cpuMeasured,
			},
		},
		Timestamp: time.Now().UTC().UnixNano(),
	}
}

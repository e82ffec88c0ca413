// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"context"
	"fmt"
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
// interval (since the epoch), until the machine ends or ctx does. Nomad asks for every task's
// stats at one interval: the tasks' samples fall together, and the plugin wakes once an
// interval for all of them, not once for each.
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
	ch := make(chan *drivers.TaskResourceUsage)
	go func() {
		defer close(ch)
		total, user, system := cpustats.New(compute), cpustats.New(compute), cpustats.New(compute)
		timer := time.NewTimer(0)
		defer timer.Stop()
		var sampler *cgroupfs.Sampler
		defer func() {
			if sampler != nil {
				sampler.Close()
			}
		}()
		for {
			select {
			case <-ctx.Done():
				return
			case <-h.doneCh:
				return
			case <-timer.C:
				timer.Reset(untilNextSample(time.Now(), interval))
			}
			h.mu.RLock()
			cg := h.cgroupPath
			h.mu.RUnlock()
			if cg == "" {
				continue
			}
			if sampler == nil {
				sampler = h.cgroups.Sampler(cg)
			}
			u, err := sampler.Read()
			if err != nil {
				if !cgroupfs.IsGone(err) {
					h.logger.Debug("reading machine cgroup", "error", err)
				}
				continue
			}
			select {
			case ch <- usage(u, total, user, system):
			case <-ctx.Done():
				return
			case <-h.doneCh:
				return
			}
		}
	}()
	return ch, nil
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

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

// Command nomad-driver-nixos-console forwards one machine's console to Nomad's log FIFO. The
// plugin carries it embedded, installs it under its data_dir and runs one per machine as a
// transient unit, so it outlives plugin restarts. It is small on purpose: standard library and
// golang.org/x/sys only.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/nomad-nixos/nomad-driver-nixos/console"
)

func main() {
	// A forwarder runs beside every machine: its heap is a few buffers, keep it at that. (A
	// memory limit near that size makes the collector run all the time: GOGC alone.)
	debug.SetGCPercent(25)

	fw := console.Forwarder{Warnings: os.Stderr}
	var backlog string
	flag.StringVar(&fw.Dir, "dir", "", "the machine directory, holding "+console.LogName)
	flag.StringVar(&fw.FIFO, "fifo", "", "Nomad's stdout log FIFO")
	flag.StringVar(&fw.StderrFIFO, "stderr-fifo", "", "Nomad's stderr log FIFO, held open")
	flag.StringVar(&backlog, "backlog", "1GiB", "how far Nomad's reader may fall behind before output is dropped")
	flag.Parse()
	var err error
	if fw.Backlog, err = console.ParseSize(backlog); err != nil {
		fmt.Fprintln(os.Stderr, "-backlog:", err)
		os.Exit(2)
	}
	if fw.Dir == "" || fw.FIFO == "" {
		fmt.Fprintln(os.Stderr, "-dir and -fifo are required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err = fw.Run(ctx)
	switch {
	case errors.Is(err, console.ErrStopped):
		// Not done: a failure, so the unit's Restart=on-failure brings a new forwarder, which
		// resumes at the saved offset. A stop of the unit is never restarted.
		os.Exit(1)
	case err != nil:
		fmt.Fprintln(os.Stderr, "console forwarder:", err)
		os.Exit(1)
	}
}

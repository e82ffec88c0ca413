// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// The issue: of a 200,000-line burst `nomad alloc logs` had 37,500. A guest prints a million
// lines at once; Nomad's log API gives every one of them back, in order, and the line after them.
func TestConsoleBurstReachesNomad(t *testing.T) {
	const lines = 1_000_000
	// About 20 MB: one log file holds it all, so rotation removes nothing.
	runJob(t, "e2e-burst", "machine.nomad.hcl", map[string]any{
		"toplevel": tiny(t), "init_args": []string{fmt.Sprintf("lines=%d", lines), "print=tinyinit: burst done", "exit=0"},
		"log_files": 2, "log_file_size": 100,
	})
	start := time.Now()
	a := waitAlloc(t, "e2e-burst", 10*time.Minute, "completion", func(a allocation) bool { return a.ClientStatus == "complete" || a.ClientStatus == "failed" })
	must.EqOp(t, "complete", a.ClientStatus, must.Sprint(pretty(a.TaskStates["t"].Events)))
	t.Logf("allocation complete %s after it was registered", time.Since(start).Round(time.Second))

	resp, err := http.Get(fmt.Sprintf("%s/v1/client/fs/logs/%s?task=t&type=stdout&origin=start&offset=0&plain=true", nomadAddr(), a.ID))
	must.NoError(t, err)
	defer resp.Body.Close()
	must.EqOp(t, http.StatusOK, resp.StatusCode)
	r := bufio.NewReaderSize(resp.Body, 256<<10)
	// doneAfter is how many numbered lines came before the done line.
	count, doneAfter := 0, -1
	var other []string
	for {
		line, err := r.ReadString('\n')
		if line != "" {
			line = strings.TrimSuffix(line, "\n")
			if line == "tinyinit: burst done" {
				doneAfter = count
			}
			if rest, ok := strings.CutPrefix(line, "tinyinit line "); ok {
				n, _ := strconv.Atoi(rest)
				must.EqOp(t, count+1, n, must.Sprintf("line %q after %d lines", line, count))
				count++
			} else if len(other) < 20 {
				other = append(other, line)
			}
		}
		if err == io.EOF {
			break
		}
		must.NoError(t, err)
	}
	must.EqOp(t, lines, count, must.Sprintf("other lines: %q", other))
	must.EqOp(t, lines, doneAfter, must.Sprintf("the done line after all others; other lines: %q", other))
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"os"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/shoenig/test/must"

	"github.com/nomad-nixos/nomad-driver-nixos/console"
)

// Each drop record becomes one task event, once, and a record still being written waits.
func TestReportDrops(t *testing.T) {
	dir := t.TempDir()
	var events []map[string]string
	h := &taskHandle{
		logger: hclog.NewNullLogger(),
		m:      &machine{dir: dir},
		emit:   func(_ string, a map[string]string) { events = append(events, a) },
	}
	dropped := console.Files{Dir: dir}.Dropped()
	must.NoError(t, os.WriteFile(dropped, []byte("2026-12-02T18:00:00Z 100\n2026-12-02T18:00:01Z 2"), 0o600))
	h.reportDrops()
	must.Eq(t, []map[string]string{{"dropped_bytes": "100", "dropped_at": "2026-12-02T18:00:00Z"}}, events)

	must.NoError(t, os.WriteFile(dropped, []byte("2026-12-02T18:00:00Z 100\n2026-12-02T18:00:01Z 250\n"), 0o600))
	h.reportDrops()
	h.reportDrops()
	must.Len(t, 2, events)
	must.Eq(t, map[string]string{"dropped_bytes": "250", "dropped_at": "2026-12-02T18:00:01Z"}, events[1])

	// A restarted plugin's handle does not report them again.
	h2 := &taskHandle{logger: hclog.NewNullLogger(), m: &machine{dir: dir}, emit: h.emit}
	h2.reportDrops()
	must.Len(t, 2, events)
}

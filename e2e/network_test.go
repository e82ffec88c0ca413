// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

// A service with address_mode = "driver" registers the machine's own address, which the driver
// reported when the task started, and the group's port reaches the guest through the host.
// The build machine shares the test host's network, so both are reachable from here.
func TestNetworkAddressAndPort(t *testing.T) {
	runJob(t, "e2e-net", "network.nomad.hcl", map[string]any{"toplevel": systemd(t)})
	a := waitAlloc(t, "e2e-net", 2*time.Minute, "running", running)

	var regs []struct {
		Address string
		Port    int
	}
	waitOutput(t, time.Minute, "registered", func() string {
		out, err := nomadErr("service", "info", "-json", "e2e-net-web")
		if err != nil || json.Unmarshal([]byte(out), &regs) != nil || len(regs) == 0 {
			return out
		}
		return "registered"
	})
	must.StrHasPrefix(t, "10.235.", regs[0].Address, must.Sprint(regs))
	must.EqOp(t, 8080, regs[0].Port)
	want := "Hello from task t of allocation " + a.ID
	must.StrContains(t, httpGet(t, fmt.Sprintf("http://%s:%d/", regs[0].Address, regs[0].Port)), want)

	var full struct {
		AllocatedResources struct {
			Shared struct {
				Ports []struct {
					Label string
					Value int
				}
			}
		}
	}
	api(t, "/v1/allocation/"+a.ID, &full)
	ports := full.AllocatedResources.Shared.Ports
	must.Len(t, 1, ports, must.Sprint(pretty(full)))
	must.StrContains(t, httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/", ports[0].Value)), want)
	must.True(t, hasEvent(a.TaskStates["t"], "Driver", "machine address "+regs[0].Address), must.Sprint(pretty(a.TaskStates["t"].Events)))
}

// httpGet fetches url, retrying while the guest's web service starts.
func httpGet(t *testing.T, url string) string {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	return waitOutput(t, time.Minute, "Hello", func() string {
		resp, err := client.Get(url)
		if err != nil {
			return err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	})
}

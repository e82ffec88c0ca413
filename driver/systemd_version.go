// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"fmt"
	"strconv"
	"strings"
)

// oldestSystemd is the oldest systemd the driver was tested with (README, "Tested hosts"): the
// unit properties and nspawn options it relies on were only seen working from there on.
const oldestSystemd = 252

// systemdAdvisory is a systemd flaw that the driver's own settings do not neutralise, with the
// versions that have it: from the first affected major on, each later major up to fixedMajor is
// fixed in the point release fixedIn gives, or not at all when it has none.
type systemdAdvisory struct {
	id, what   string
	firstMajor int
	fixedMajor int
	fixedIn    map[int]int
}

// systemdAdvisories: CVE-2026-40226 (an escape through a crafted .nspawn settings file, 233 to
// 259) is not here: every machine runs with --settings=no.
var systemdAdvisories = []systemdAdvisory{{
	id:         "CVE-2026-40223",
	what:       "a unit with Delegate=yes and no User= can make PID 1 fail an assertion, and every machine unit is such a unit",
	firstMajor: 258,
	fixedMajor: 260,
	fixedIn:    map[int]int{258: 5, 259: 2},
}}

// systemdVersion parses the version systemd reports ("252.39-1~deb12u1", "257.9", "v260~rc1")
// into its major version and point release.
func systemdVersion(v string) (major, point int, err error) {
	num := strings.TrimPrefix(v, "v")
	if i := strings.IndexFunc(num, func(r rune) bool { return r != '.' && (r < '0' || r > '9') }); i >= 0 {
		num = num[:i]
	}
	maj, pt, _ := strings.Cut(num, ".")
	if major, err = strconv.Atoi(maj); err != nil {
		return 0, 0, fmt.Errorf("systemd reports version %q, which does not start with a number; the driver needs systemd %d or later", v, oldestSystemd)
	}
	if pt != "" {
		p, _, _ := strings.Cut(pt, ".")
		if point, err = strconv.Atoi(p); err != nil {
			return 0, 0, fmt.Errorf("systemd version %q: no point release after the major version", v)
		}
	}
	return major, point, nil
}

// systemdProblem is why the driver refuses to run machines under systemd v, or "".
func systemdProblem(v string) string {
	major, point, err := systemdVersion(v)
	if err != nil {
		return err.Error()
	}
	if major < oldestSystemd {
		return fmt.Sprintf("systemd %s is older than %d, the oldest version this driver is tested with (%d on hybrid cgroups, 257 on cgroup v2); upgrade systemd, e.g. to Debian 12's or NixOS 25.05's", v, oldestSystemd, oldestSystemd)
	}
	for _, a := range systemdAdvisories {
		if major < a.firstMajor || major >= a.fixedMajor {
			continue
		}
		if fixed, ok := a.fixedIn[major]; ok && point >= fixed {
			continue
		}
		fixes := make([]string, 0, len(a.fixedIn)+1)
		for m := a.firstMajor; m < a.fixedMajor; m++ {
			if p, ok := a.fixedIn[m]; ok {
				fixes = append(fixes, fmt.Sprintf("%d.%d", m, p))
			}
		}
		fixes = append(fixes, fmt.Sprintf("%d", a.fixedMajor))
		return fmt.Sprintf("systemd %s has %s (%s); upgrade to %s or later", v, a.id, a.what, strings.Join(fixes, ", "))
	}
	return ""
}

// Copyright (c) The nomad-driver-nixos authors
// SPDX-License-Identifier: MPL-2.0

package driver

import (
	"sync"
	"time"
)

// taskHandleVersion is the version of TaskState inside Nomad's task handles.
const taskHandleVersion = 1

// TaskState is what Nomad keeps for a task across plugin and client restarts: enough to find the
// machine again without the task's raw config, which Nomad does not keep (see RecoverTask).
type TaskState struct {
	Config       TaskConfig
	Machine      string
	Unit         string
	InvocationID string
	MachineDir   string
	StartedAt    time.Time
}

type taskStore struct {
	mu    sync.RWMutex
	tasks map[string]*taskHandle
}

func newTaskStore() *taskStore { return &taskStore{tasks: map[string]*taskHandle{}} }

func (s *taskStore) get(id string) (*taskHandle, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	h, ok := s.tasks[id]
	return h, ok
}

// add stores h unless a task of that ID exists; it reports whether it did.
func (s *taskStore) add(id string, h *taskHandle) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.tasks[id]; ok {
		return false
	}
	s.tasks[id] = h
	return true
}

func (s *taskStore) delete(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.tasks, id)
}

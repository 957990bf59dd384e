"""The launch: plan, preflight, memory and time estimates, run lock, supervisor, worker, manifest."""

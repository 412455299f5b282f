"""glassbox.fault_tolerance: SCAR (partial recovery, prioritized partial checkpoints, fault injection). Not built
yet; it stands on glassbox.checkpoints' per-tensor and per-shard loading."""

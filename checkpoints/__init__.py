"""glassbox.checkpoints: every intermediate checkpoint, sharded (DCP), hash-verified, committed by rename;
exact and resharded resume, per-tensor and per-shard loading, and export to Hugging Face format."""

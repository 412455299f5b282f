"""glassbox.fault_tolerance: SCAR (Qiao et al., ICML 2019; ALGORITHMS.md) for LLM training.

A failure loses one rank's FSDP2 shards of the parameters and Adam moments. SCAR bounds what that costs: partial
recovery restores only the lost blocks (survivors keep their values, the step, data cursor and LR do not rewind),
and prioritized partial checkpoints spend a full checkpoint's I/O on the blocks that changed most, so the restored
copies are as close as the budget allows to what was lost.

- blocks.py: the state as blocks (rows of a parameter and its moments, never straddling a shard) and access to a
  live model and optimizer, whole or as one FSDP2 rank's local shards.
- selection.py: which blocks a partial checkpoint writes (prioritized, round-robin, random) at equal I/O.
- block_store.py: the zarr store of block versions, atomic per block, checksummed.
- recovery.py: block sources (block store, glassbox checkpoint, in-memory snapshot), `recover_blocks` and the
  recovery event that `apply_event` replays bit-exactly.
"""

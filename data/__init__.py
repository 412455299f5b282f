"""glassbox.data: corpora -> tokenizer -> token store (megatron IndexedDataset), the world-size-free global
sample order with its cursor, and the per-step data-order log."""

"""glassbox.pruning: offline pruning of glassbox MoE models into new Hugging Face directories.

STUN (structured-then-unstructured): drop experts by clustering them on calibration co-selection (or router-weight
distance), then Wanda-prune the weights of the surviving experts. Baselines in the same family: Wanda alone,
expert pruning alone, random expert drop. Every result is a model directory the engine serves and transformers
loads (per-layer expert counts: `glassbox_moe`).
"""

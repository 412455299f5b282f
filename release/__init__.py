"""glassbox.release: Hub-ready releases of a run (a branch per checkpoint, model card, dataset repo, manifest),
push, verify, analyze, and the `reproduce` replay of any step."""

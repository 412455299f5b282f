"""Learning-to-rank scheduling (Fu et al., NeurIPS 2024): a ranker trained on the served model's own output lengths
(`collect`, `train`, `evaluate`) and the policy that schedules by its scores, shortest predicted first (`policy`)."""

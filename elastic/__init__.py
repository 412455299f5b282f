"""glassbox.elastic: Pollux (Qiao et al., OSDI 2021; ALGORITHMS.md) for LLM training.

Per job, the agent adapts batch size and learning rate to maximise goodput (throughput x statistical efficiency);
across jobs, PolluxSched gives GPUs to the jobs whose goodput gains most from them.

- gns.py: the gradient noise scale from the norms the step already computes (no per-parameter hooks).
- throughput.py: the step-time model, fitted to observed steps, with priors for unseen allocations.
- goodput.py: statistical efficiency, goodput, and the batch shape to run (with the 5% switching rule).
- lr_scaling.py: AdaScale / square-root LR gain and efficiency-weighted progress.
- agent.py: the agent as a step plan plus a callback, its state in checkpoints, its decisions in metrics.jsonl.
- config.py, cli.py, worker.py: `glassbox elastic run`, restarting training under torchrun at another world size.
- sched/: the cluster scheduler, its baselines, the trace-driven simulator and the Ray executor.
"""

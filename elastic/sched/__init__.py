"""PolluxSched: goodput-driven cluster scheduling of elastic jobs, its baselines, a trace-driven simulator and an executor on a real resource manager."""

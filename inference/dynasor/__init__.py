"""Dynasor: certainty-guided reasoning programs served by the engine.

A reasoning program (self-consistency over n samples, or one long chain of thought with probes) is a group of
engine requests scheduled together. Certaindex (`certaindex`) measures how settled a program's answer is; the
controller (`controller`) stops certain programs early, gives more samples to uncertain ones, and stops a chain of
thought once its probes (short forks of the running sequence, `LLMEngine.fork`) agree.
"""

"""Discrete-event GPU-cluster simulator, baseline policies and the offline Bélády oracle."""

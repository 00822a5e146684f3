"""Staged rollouts as a pure function: `engine.step(snapshot, event) -> (snapshot, actions)`.

model.py holds the snapshot the driver loads and saves, engine.py the transition tables and the
threshold, retry, timeout and rate rules, gates.py the telemetry gates. Nothing here does I/O.
"""

"""Timing helpers for tests that act while a generation runs."""

import time


def slow_steps(engine, monkeypatch, seconds=0.02):
    """A model this slow per step: time to act while a generation runs, whatever the machine."""
    step = engine._step

    def slow_step():
        time.sleep(seconds)
        step()

    monkeypatch.setattr(engine, "_step", slow_step)


def eventually(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True

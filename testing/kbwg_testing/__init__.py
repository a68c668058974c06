"""kbwg_testing: helpers shared by the unit tests, the netns scenario tests and the benches.

One place for waiting on a condition, so every test fails the same way (a deadline and a
reason) instead of each file growing its own poll loop or, worse, a fixed sleep.
"""

from kbwg_testing.wait import WaitTimeout, wait_for, wait_until

__all__ = ["WaitTimeout", "wait_for", "wait_until"]

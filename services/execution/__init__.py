"""Execution service: runs untrusted programs against MBPP-style asserts in a sandbox."""

"""Refinement service: pi_Refine writes repaired programs from (task, failing program, feedback)."""

"""Feedback service: natural-language feedback on failing programs, checked through execution, stored, exported."""

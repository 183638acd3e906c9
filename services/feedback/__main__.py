"""Feedback service: natural-language feedback on failing programs, checked, stored and exported."""
from services.feedback.server import main

main()

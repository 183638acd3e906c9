"""The ILF loop: evaluation, rounds, the paper comparison, the retraining policy and their reports.

A gRPC client of the services (never imports them); the command line (cli/) wires it to them."""

"""The fine-tuning job (`python -m trainer --store URL --run-id ID`); it imports only `ilf.*`."""

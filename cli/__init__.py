"""The `ilf` command line: the composition root, the only package that starts services."""

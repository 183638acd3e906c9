"""Generation service: serves the code model over gRPC and the TGI HTTP protocol, with hot swaps."""

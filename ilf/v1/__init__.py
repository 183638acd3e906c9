"""Generated gRPC stubs of the ilf.v1 contract (protos/generate.sh); do not edit."""

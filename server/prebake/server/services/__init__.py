"""One module per gRPC service of `prebake.v1`."""

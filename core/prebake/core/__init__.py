"""What client and server share, defined once: digests, manifest path rules, the
contract's enum names and key fields, and the error model.

Depends only on the thin client's own dependencies (the `prebake.v1` stubs, protobuf,
grpcio, xxhash); never on `prebake.client`, `prebake.server` or `prebake.compiler`.
"""

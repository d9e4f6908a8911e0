"""Authentication and roles: who may call which rpc of a prebake server.

Modules (each small, each with its contract):
- `tokens`: the token file (JSON lines of hashed tokens or certificate subjects) and
  its edits (`prebake token add / revoke / list`); standard library only.
- `rpc_roles`: `RPC_ROLES`, the one table of rpc -> roles allowed, and the open rpcs.
- `authenticator`: resolves a bearer token or a client certificate to a `Principal`,
  re-reading the token file whenever it changes.
- `interceptor`: the one grpc.aio server interceptor that enforces the table.
- `request_rules`: the rules that depend on a request's fields (replace, enqueue).
- `listen_policy`: no anonymous server on a non-loopback address.
- `tls`: server credentials from the certificate files.
- `token_cli`: the `prebake token` command (a `prebake.commands` plugin).

This package imports nothing at load time, so the CLI plugin stays cheap.
"""

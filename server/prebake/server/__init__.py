"""prebake server: gRPC services over a SQLite registry and a content-addressed blob store."""

"""`jtinker serve`: the Tinker REST protocol over jtinker's engines, so the official `tinker` SDK and the
`tinker-cookbook` recipes run unchanged with `TINKER_BASE_URL=http://host:port`.

Layout: `app` (the ASGI app and its mount points), `runtime` (engines, ordering, slots, futures), `store`
(SQLite durability), `wire` (the SDK's protobuf and JSON forms), `common` (auth and request helpers) and the
`routes_*` modules, one per group of endpoints.
"""

"""Tools that are not part of a serving node: the deterministic simulator (``sim``),
the local cluster (``cluster``) and its fault-injecting proxy (``netproxy``), the
demo, the Envoy bootstrap used by tests and benchmarks, and the cross-region test
framework (``xr``). A serving node never imports them (checked by import-linter)."""

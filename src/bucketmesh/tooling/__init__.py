"""Tools that are not part of a serving node: the deterministic simulator, the local cluster and its fault proxy, the demo, and the cross-region test framework (xr)."""

"""The process: config file and environment (``config``), what a node runs with
(``settings``), the node that wires store, front doors and mesh together (``serve``)
and the command line (``cli``)."""

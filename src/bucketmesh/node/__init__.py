"""The process: config, settings, the node that wires the layers together, and the command line."""

"""The pure core: bucket state and its merge, the limiter, the rules. No sockets, clocks, files or Redis; time is an argument."""

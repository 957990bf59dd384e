"""The benchmark of the kit's training path and its speed checks: not the runtime (see bench/README.md)."""

"""What users run: the ``execbroker`` command line, the async Incus client, terminal handling."""

"""The instance runtime of a node: records, pid1, spawning, launching, root filesystems, cgroups."""

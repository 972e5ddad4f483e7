"""Cluster brokering: who owns an instance or operation, forward or serve locally; directory,
controller, member link, relay, placement, start-up."""

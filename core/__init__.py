"""The IO-free core: the Incus vocabulary every layer shares (errors, identity, operations, events,
exec rules, session state)."""

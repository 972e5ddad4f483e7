"""One node: the NodeAgent actor, NodeService, exec sessions and their fd IO; the instance runtime in
``runtime``."""

"""Job cgroups: the host's hierarchies, each job's groups, and the backend that makes them."""

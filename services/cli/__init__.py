"""The `shoal` command line: services, agents, a local stack, and the API client."""

"""The shoal services. Each subpackage is one process role; none imports another, they share only `shared`."""

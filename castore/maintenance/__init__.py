"""Maintenance: retention policies, garbage collection, verify, and the maintainer that runs them."""

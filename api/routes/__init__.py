"""HTTP routes, one Blueprint per area."""

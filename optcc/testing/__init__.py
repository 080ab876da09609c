"""Tools for testing optcc and the passes written for it (needs the ``dev`` extra: hypothesis)."""

"""Output files: atomic writes, the status table, coords and feature stores."""

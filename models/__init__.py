"""Data: the model catalog and the bundled demo model (no code lives here)."""

"""Small shared helpers (image I/O and range conversions, logging)."""

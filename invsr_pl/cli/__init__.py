"""Command-line tools (invsr-sr)."""

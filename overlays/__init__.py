"""overlays package."""

"""helpers package."""

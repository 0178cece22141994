"""jwt_tools package."""

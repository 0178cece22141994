"""ca_adapters package."""

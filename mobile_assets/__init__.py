"""mobile_assets stage."""

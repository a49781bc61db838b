"""PathInfo records and the services that store them."""

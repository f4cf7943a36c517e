"""Zoo model modules; importing this package registers them."""

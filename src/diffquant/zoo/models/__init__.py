"""Zoo model modules; importing this package registers them."""
from diffquant.zoo.models import fmnist_dit  # noqa: F401

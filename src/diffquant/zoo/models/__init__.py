"""Zoo model modules; importing this package registers them."""
from diffquant.zoo.models import fmnist_dit, fmnist_sd  # noqa: F401

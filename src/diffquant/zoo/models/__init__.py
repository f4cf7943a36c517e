"""Zoo model modules; importing this package registers them, then their outlier variants."""
from diffquant.zoo import variants
from diffquant.zoo.models import fmnist_dit, fmnist_sd  # noqa: F401

variants.register_variants()

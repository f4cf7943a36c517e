"""The core imports neither diffusers nor transformers at import time (integrations load lazily)."""

import subprocess
import sys


def test_core_import_does_not_pull_diffusers_or_transformers():
    code = (
        "import sys, diffquant, diffquant.formats, diffquant.nn, diffquant.recipes, diffquant.calib, "
        "diffquant.arch, diffquant.checkpoint, diffquant.zoo, diffquant.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

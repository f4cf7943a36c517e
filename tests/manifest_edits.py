"""Edit a saved manifest the way a careful tamperer would: change it, then seal it again, so the
loader's schema and consistency checks (not only the seal) are what is tested."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffquant.folders import SEAL, sealed


def edit_manifest(file: Path, change: Callable[[dict[str, Any]], None], reseal: bool = True) -> None:
    """Apply `change`; reseal=False keeps the old seal (a plain edit)."""
    data = json.loads(file.read_text())
    seal = data.pop(SEAL, None)
    change(data)
    file.write_text(json.dumps(sealed(data) if reseal else {**data, SEAL: seal}))

"""Files that readers never see half-written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def finite(obj: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf are not JSON: they become null (strict parsers reject the file otherwise)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in obj.items()}


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)



"""Reading a JSON file a user handed us: any failure is one FormatError naming the file."""
from __future__ import annotations

import json
import os
from pathlib import Path

from weightswarm.errors import FormatError


def read_json(path: str | os.PathLike):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FormatError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(path, f"not valid JSON: {e}") from None

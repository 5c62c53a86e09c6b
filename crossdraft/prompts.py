"""Prompt files: JSON Lines read into prompts, and where the model zoo lives.

Never: touches models.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InvalidArgument


def zoo_dir() -> Path:
    """../shared/zoo next to the checkout (or the current directory's ../shared/zoo)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base.parent / "shared" / "zoo"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "zoo"


def read_prompts(path: str, field: str = "prompt", chars: int = 0, limit: int = 0, min_chars: int = 0) -> list:
    """JSON Lines with a `prompt` field (or `text`, cut to `chars` characters, as in the zoo's dev set);
    records shorter than `min_chars` are skipped (a prompt needs a continuation to be worth timing)."""
    if not os.path.isfile(path):
        raise InvalidArgument(f"prompts file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InvalidArgument(f"{path}:{n}: expected a JSON object")
            val = obj.get(field, obj.get("text") if field == "prompt" else None)
            if not isinstance(val, str):
                raise InvalidArgument(f"{path}:{n}: no string field {field!r}")
            if len(val) < min_chars:
                continue
            out.append(val[:chars] if chars else val)
            if limit and len(out) >= limit:
                break
    if not out:
        raise InvalidArgument(f"{path}: no prompts")
    return out

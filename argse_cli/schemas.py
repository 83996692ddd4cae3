"""JSON Schemas of every stage config (``make schemas`` writes them to ``schemas/``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import STAGE_MODELS

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"


def render(stage: str) -> str:
    schema = STAGE_MODELS[stage].model_json_schema(mode="validation")
    schema = {k: v for k, v in schema.items()}
    for runtime in ("data_root",):  # defaults read from the environment are not part of the schema
        schema.get("properties", {}).get(runtime, {}).pop("default", None)
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    write = "--write" in argv
    stale = []
    for stage in STAGE_MODELS:
        p = SCHEMA_DIR / f"{stage}.json"
        text = render(stage)
        if write:
            SCHEMA_DIR.mkdir(exist_ok=True)
            p.write_text(text)
        elif not p.exists() or p.read_text() != text:
            stale.append(stage)
    if stale:
        print(f"schemas out of date: {stale}; run `make schemas`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

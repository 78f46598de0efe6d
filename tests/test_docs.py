"""The README's config reference matches the config schema: every key it names exists, and every default
it states as a plain value is the value `python train.py` resolves (the schema under configs/default.yaml)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from hybrid.config import load_config

ROOT = Path(__file__).resolve().parents[1]
_ABSENT = object()


def _config_table() -> list[tuple[str, str]]:
    """(key column, default column) of every row of the README's table under '## Configuration'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[0] not in ("key", "---"):
            rows.append((cells[0], cells[1]))
    return rows


def _keys(column: str) -> list[str]:
    """`trainer.accelerator`, `.devices` -> trainer.accelerator, trainer.devices (a leading dot reuses the
    previous key's group); placeholders such as `<stage>.train.*` are skipped."""
    keys, group = [], ""
    for token in re.findall(r"`([^`]+)`", column):
        if "<" in token or "*" in token:
            continue
        if token.startswith("."):
            token = group + token
        group = token.rsplit(".", 1)[0] if "." in token else ""
        keys.append(token)
    return keys


def _plain_defaults(column: str) -> list[object] | None:
    """The default column as values, when it is a comma-separated list of plain literals; else None."""
    parts = [p.strip() for p in re.split(r",\s*(?![^\[]*\])", column)]
    values = []
    for part in parts:
        literal = part[1:-1] if part.startswith("`") and part.endswith("`") else part
        if not literal or (any(ch in literal for ch in "<>/() ") and not literal.startswith("[")):
            return None
        try:  # YAML 1.1 reads 3e-3 as a string
            values.append(float(literal) if re.fullmatch(r"-?\d+(\.\d*)?e-?\d+", literal) else yaml.safe_load(literal))
        except yaml.YAMLError:
            return None
    return values


def test_readme_config_reference_matches_the_schema():
    resolved = load_config(ROOT / "configs" / "default.yaml")
    rows = _config_table()
    assert len(rows) >= 20, "the README's config table was not found"
    checked_defaults = 0
    for key_column, default_column in rows:
        keys = _keys(key_column)
        for key in keys:
            assert OmegaConf.select(resolved, key, default=_ABSENT) is not _ABSENT, \
                f"README config table names '{key}', which the config schema does not have"
        defaults = _plain_defaults(default_column)
        if not keys or defaults is None:
            continue
        if len(defaults) == 1 and len(keys) > 1:
            defaults = defaults * len(keys)
        if len(defaults) != len(keys):
            continue
        for key, value in zip(keys, defaults):
            actual = OmegaConf.select(resolved, key)
            actual = OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual
            assert actual == value, f"README says {key} defaults to {value!r}; the config resolves {actual!r}"
            checked_defaults += 1
    assert checked_defaults >= 30, f"only {checked_defaults} defaults could be read from the README table"

"""One YAML configuration: defaults in ``config.yaml``, a user file on top, ``key=value`` overrides.

Output folders are named after the parameters that made them (``output_name``): a readable
label formatted from the section's ``name`` template plus a short hash of everything that
went in, so outputs made with other settings, or from other upstream outputs, never mix.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from common import UserError
from common.schema import validate

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config.yaml"


def _deep_update(base: dict, update: Mapping) -> dict:
    for key, value in update.items():
        if value is None and isinstance(base.get(key), dict):
            continue  # a section whose keys are all commented out: nothing to change
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def apply_override(conf: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML (``5``, ``true``...)."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form section.key=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = conf
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise UserError(f"override {item!r}: no section {key!r} in the configuration")
        node = node[key]
    if keys[-1] not in node:
        raise UserError(f"override {item!r}: unknown key {keys[-1]!r} (known: {sorted(node)})")
    node[keys[-1]] = parse_yaml(raw, f"override {item!r}")


def parse_yaml(text: str, what: str) -> Any:
    """``text`` parsed as YAML; a ``UserError`` naming ``what`` when it is not YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{what} is not valid YAML: {reason}") from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """The defaults, updated by the YAML file at ``path`` and then by ``overrides``, checked
    against the schema (``common.schema``) before any work."""
    defaults = yaml.safe_load(DEFAULT_CONFIG.read_text())
    conf = copy.deepcopy(defaults)
    if path:
        if not Path(path).is_file():
            raise UserError(f"configuration file not found: {path}")
        user = parse_yaml(Path(path).read_text(), f"configuration file {path}") or {}
        if not isinstance(user, Mapping):
            raise UserError(f"configuration file {path} must hold sections of key: value lines")
        _deep_update(conf, user)
    for item in overrides:
        apply_override(conf, item)
    validate(conf, defaults)
    return conf


def digest(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def repo_path(path: str | Path) -> Path:
    """A path of the configuration (a model, an index folder): as given when absolute or when
    it exists from here, else inside the repository (where the shipped assets are), so the
    installed ``copydet`` works from any folder."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def file_digest(path: str | Path) -> str:
    """A short hash of a file's bytes (``missing`` when there is no such file)."""
    path = repo_path(path)
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"


def output_name(section: Mapping[str, Any], *upstream: str) -> str:
    """``<label>-<hash>``: label from the section's ``name`` template, hash of section+upstream."""
    params = {k: v for k, v in section.items() if k != "name"}
    label = section.get("name", "out").format(**params)
    label = label.replace(",", "_").replace("/", "_").replace(" ", "")
    return f"{label}-{digest(params, upstream)}"

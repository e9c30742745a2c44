"""What each setting accepts: ``validate`` checks a whole configuration before any work.

A key takes values of its default's type in ``config.yaml`` (an integer setting takes
integers, a number setting integers or decimals, a text setting text, a list a list; a
``null`` default anything), narrowed or widened by its ``Rule`` in ``RULES``: a range, the
only values it takes (``choices``), values it takes besides its type (``also``: ``auto``),
other types (``kind``), the type and number of a list's items. Unknown sections and keys (a
misspelt key in a ``--config`` file) and ``name`` templates that name no key are refused too.
Each refusal is one ``UserError`` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common import UserError

NUMBER: tuple[type, ...] = (int, float)
KIND_NAMES = {int: "an integer", float: "a number", str: "a text", bool: "true or false",
              list: "a list", type(None): "null", dict: "a section"}


@dataclass(frozen=True)
class Rule:
    """What one key accepts beyond its default's type (module docstring)."""

    low: float | None = None  # inclusive lower bound (of a number, or of a list's items)
    above: float | None = None  # exclusive lower bound
    high: float | None = None  # inclusive upper bound
    choices: tuple = ()  # the only values allowed
    also: tuple = ()  # values allowed besides those of the type
    kind: tuple[type, ...] = ()  # the types allowed, instead of the default's
    item: tuple[type, ...] = ()  # the type of a list's items
    length: int | None = None  # the length of a list
    min_length: int = 0  # the fewest items of a list
    unique: bool = False  # a list's items are all different


COUNT = Rule(low=1)
FRACTION = Rule(low=0, high=1)
GPU = Rule(kind=(bool,), also=("auto",))
DEVICE = Rule(kind=(str, int, list))
RULES: dict[str, Rule] = {
    "run.shard_size": COUNT,
    "run.scheduler": Rule(kind=(str, type(None))),
    "run.lock_wait_s": Rule(low=0, kind=NUMBER),
    "local_fea.short_side": Rule(low=32),
    "local_fea.max_keypoints": COUNT,
    "local_fea.query_max_keypoints": COUNT,
    "local_fea.contrast_threshold": Rule(above=0),
    "local_fea.edge_threshold": Rule(above=0, kind=NUMBER),
    "local_fea.thumb_side": Rule(low=8),
    "local_fea.max_pixels": COUNT,
    "local_search.nprobe": Rule(low=1, kind=(int,), also=("auto",)),
    "local_search.k": Rule(low=2),
    "local_search.candidates": COUNT,
    "local_search.gpu": GPU,
    "local_search.block_mb": COUNT,
    "local_search.gpu_block_mb": COUNT,
    "local_search.query_batch": COUNT,
    "local_search.index_part_mb": Rule(above=0, kind=NUMBER),
    "match_score.ratio": Rule(low=1),
    "match_score.ransac_px": Rule(above=0),
    "match_score.ransac_iters": COUNT,
    "match_score.ransac_confidence": Rule(above=0, high=1),
    "match_score.second_plane_min": Rule(low=4),
    "match_score.dense_cell": Rule(low=2),
    "match_score.dense_blur": Rule(low=0),
    "match_score.dense_min_std": Rule(low=0),
    "match_score.dense_ncc": Rule(low=-1, high=1),
    "match_score.coverage_grid": COUNT,
    "match_score.chunk_pairs": COUNT,
    "match_score.pair_model": Rule(kind=(str, type(None))),
    "global_fea.weights": Rule(),
    "global_fea.pool": Rule(choices=("gem", "avg", "max")),
    "global_fea.gem_p": Rule(above=0),
    "global_fea.proj_dim": Rule(low=0),
    "global_fea.image_size": Rule(low=32),
    "global_fea.mean": Rule(item=NUMBER, length=3),
    "global_fea.std": Rule(item=NUMBER, length=3, above=0),
    "global_fea.max_pixels": COUNT,
    "global_fea.batch_size": Rule(kind=(int,), low=1, also=("auto",)),
    "global_fea.workers": Rule(kind=(int,), low=0, also=("auto",)),
    "global_fea.device": DEVICE,
    "global_fea.runtime": Rule(choices=("auto", "torch", "onnx")),
    "global_search.k": COUNT,
    "global_search.norm_k": COUNT,
    "global_search.norm_beta": Rule(low=0),
    "global_search.max_pairs": Rule(low=0),
    "global_search.block": COUNT,
    "global_search.gpu": GPU,
    "merge.method": Rule(choices=("fusion", "max")),
    "merge.branches": Rule(item=(str,), min_length=1, unique=True),
    "merge.fill_rank": Rule(low=0),
    "merge.max_pairs": COUNT,
    "dedupe.threshold": Rule(low=0, high=1),
    "dedupe.grouping": Rule(choices=("star", "components")),
    "dedupe.candidates": Rule(low=0, kind=(int,)),
    "preprocess.imgsz": Rule(low=32),
    "preprocess.device": DEVICE,
    "preprocess.batch": COUNT,
    "preprocess.min_conf": FRACTION,
    "preprocess.max_det": COUNT,
    "preprocess.conf_global": FRACTION,
    "preprocess.conf_local": FRACTION,
    "preprocess.max_area": Rule(above=0, high=1),
    "preprocess.max_aspect": Rule(low=1),
    "preprocess.min_side": Rule(low=0),
    "preprocess.margin": Rule(low=0),
    "preprocess.crop_quality": Rule(low=1, high=100),
}


def show(value: Any) -> str:
    """A value as it is written in YAML."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def kinds_of(default: Any, rule: Rule) -> tuple[type, ...]:
    """The types a key takes: its rule's, else its default's (any for a null default)."""
    if rule.kind:
        return rule.kind
    if default is None:
        return ()
    return NUMBER if isinstance(default, float) else (type(default),)


def is_kind(value: Any, kinds: tuple[type, ...]) -> bool:
    """``value`` is of one of ``kinds`` (a bool is not an integer); any value for none."""
    if not kinds:
        return True
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def in_range(value: Any, rule: Rule) -> bool:
    return ((rule.low is None or value >= rule.low) and (rule.above is None or value > rule.above)
            and (rule.high is None or value <= rule.high))


def fits(value: Any, kinds: tuple[type, ...], rule: Rule) -> bool:
    """Whether a key with these types and rule takes ``value``."""
    if any(type(value) is type(c) and value == c for c in (*rule.choices, *rule.also)):
        return True
    if rule.choices or not is_kind(value, kinds):
        return False
    if isinstance(value, list):
        return ((rule.length is None or len(value) == rule.length)
                and len(value) >= rule.min_length
                and (not rule.unique or len(set(map(str, value))) == len(value))
                and all(is_kind(v, rule.item) for v in value)
                and (not set(rule.item) & set(NUMBER) or all(in_range(v, rule) for v in value)))
    if is_kind(value, NUMBER):
        return in_range(value, rule)
    return True


def bounds(rule: Rule) -> str:
    """`` >= 1 and <= 100``, `` > 0``... (empty without bounds)."""
    parts = [f"{op} {show(v)}" for op, v in ((">=", rule.low), (">", rule.above),
                                             ("<=", rule.high)) if v is not None]
    return f" {' and '.join(parts)}" if parts else ""


def kind_words(kinds: tuple[type, ...]) -> str:
    """``an integer``, ``a number``, ``a text or null``... (``anything`` for no types)."""
    if set(NUMBER) <= set(kinds):
        kinds = tuple(k for k in kinds if k is not int)
    return " or ".join(KIND_NAMES[k] for k in kinds) or "anything"


def allowed(kinds: tuple[type, ...], rule: Rule) -> str:
    """What a key takes, in words."""
    if rule.choices:
        return "one of " + ", ".join(map(show, rule.choices))
    if rule.item:
        size = (f" of {rule.length} items" if rule.length
                else f" of at least {rule.min_length} item(s)" if rule.min_length else "")
        each = "each different, " if rule.unique else ""
        text = f"a list{size}, {each}each {kind_words(rule.item)}{bounds(rule)}"
    else:
        text = kind_words(kinds) + bounds(rule)
    return " or ".join([text, *map(show, rule.also)])


def check(key: str, value: Any, default: Any) -> None:
    """Refuse ``value`` for ``key`` (``section.key``) unless its rule allows it."""
    rule = RULES.get(key, Rule())
    kinds = kinds_of(default, rule)
    if not fits(value, kinds, rule):
        raise UserError(f"{key}={show(value)} is not allowed: it takes {allowed(kinds, rule)}")


def check_name(section: str, values: Mapping[str, Any]) -> None:
    """The section's ``name`` template formats with its keys."""
    template = values.get("name")
    if not isinstance(template, str):
        return
    try:
        template.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise UserError(f"{section}.name={template!r} is not a template of {section}'s keys "
                        f"({type(err).__name__}: {err})") from None


def validate(conf: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Check every section and key of ``conf`` against ``defaults`` and ``RULES``."""
    for section, values in conf.items():
        if section not in defaults:
            raise UserError(f"unknown section {section!r} in the configuration (known: "
                            f"{', '.join(defaults)})")
        if not isinstance(values, Mapping):
            raise UserError(f"{section} must be a section of key: value lines, not "
                            f"{show(values)}")
        for key, value in values.items():
            if key not in defaults[section]:
                raise UserError(f"unknown setting {section}.{key} (known in {section}: "
                                f"{', '.join(defaults[section])})")
            check(f"{section}.{key}", value, defaults[section][key])
        check_name(section, values)

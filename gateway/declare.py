"""Setting declarations: each setting is one field of its component's frozen config.

The field carries everything about the setting: its file key (the field's name), environment
variable, parser, default and documentation line; its Python type is the field's annotation,
which mypy checks wherever the component reads it. :mod:`gateway.settings` collects the
declarations (:func:`specs_of`) to read, validate and document them, and builds each
component's config from the parsed values (:func:`build`). Nothing here reads the environment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

_META = "gateway.setting"
T = TypeVar("T")


@dataclass(frozen=True)
class Spec:
    """One setting: its file key, environment variable, parser, default and documentation."""

    key: str
    env: str
    parse: Callable[[object], Any]
    default: str | None  # None: required
    doc: str
    section: str
    file_variant: bool = False  # may come as <ENV>_FILE
    secret: bool = False  # never shown: only a fingerprint


@dataclass(frozen=True)
class _Declared:
    env: str
    parse: Callable[[object], Any]
    default: str | None
    doc: str
    file_variant: bool
    secret: bool


def setting(env: str, parse: Callable[[object], Any], default: str | None, doc: str, *,
            file_variant: bool = False, secret: bool = False) -> Any:
    """Declare a config field as a setting (``default=None``: required; ``secret``: its value
    is never shown, ``repairy-gateway config`` gives a fingerprint)."""
    return field(metadata={_META: _Declared(env, parse, default, doc, file_variant, secret)})


def specs_of(config: type) -> tuple[Spec, ...]:
    """The settings a config class declares, in field order, in its ``SECTION``."""
    section: str = config.__dict__["SECTION"]
    found = []
    for f in fields(config):
        d = f.metadata.get(_META)
        if isinstance(d, _Declared):
            found.append(Spec(f.name, d.env, d.parse, d.default, d.doc, section,
                              d.file_variant, d.secret))
    return tuple(found)


def build(config: type[T], values: Mapping[str, Any]) -> T:
    """A config from parsed values by file key (the keys it does not declare are ignored)."""
    return config(**{spec.key: values[spec.key] for spec in specs_of(config)})

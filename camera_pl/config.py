"""Config objects: one frozen dataclass per method, which validates itself.

Each verb (``prune``, ``quantize``, ``apply_odp``, ``compress_experts``, ``recover``) takes its
config object, or the same options as keywords (``prune(model, stats, ratio=0.4,
allocation="global")`` builds a :class:`~camera_pl.pruning.config.PruneConfig`). Recipe
steps and callback arguments are the same configs, so the Python API, the YAML recipes and
LightningCLI accept the same names. An unknown or misspelt option, a value out of range or a
contradictory combination raises :class:`ConfigError` naming the option and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Iterable, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """An option of a camera_pl config is unknown, out of range or contradicts another."""


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_options(owner: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for the first option of ``given`` not in ``known``."""
    known = list(known)
    for name in given:
        if name not in known:
            raise ConfigError(f"{owner} has no option {name!r}.{_suggest(name, known)} "
                              f"Options: {', '.join(sorted(known))}.")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of camera_pl's config objects."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Validate the options (subclasses raise :class:`ConfigError`)."""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls: type[C], config: C | None = None, **options: Any) -> C:
        """``config`` with ``options`` applied, or a new config from ``options``; unknown names raise."""
        unknown_options(cls.__name__, options, cls.option_names())
        if config is None:
            return cls(**options)
        if not isinstance(config, cls):
            raise ConfigError(f"Expected a {cls.__name__}, got {type(config).__name__}.")
        return dataclasses.replace(config, **options) if options else config

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """A config from a mapping (e.g. a YAML recipe step); unknown keys raise."""
        return cls.build(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- validation helpers ------------------------------------------------------------------
    def _fail(self, option: str, problem: str) -> None:
        raise ConfigError(f"{type(self).__name__}.{option}={getattr(self, option)!r}: {problem}")

    def _choice(self, option: str, choices: Iterable[str]) -> None:
        choices = list(choices)
        value = getattr(self, option)
        if value not in choices:
            hint = _suggest(value, choices) if isinstance(value, str) else ""
            self._fail(option, f"choose one of {', '.join(map(repr, choices))}.{hint}")

    def _number(self, option: str, low: float | None = None, high: float | None = None, *, integer: bool = False,
                low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
        value = getattr(self, option)
        if value is None and optional:
            return
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and math.isnan(value)):
            self._fail(option, f"expected {'an integer' if integer else 'a number'}"
                               f"{' or None' if optional else ''}.")
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            self._fail(option, f"must lie in {left}{'-inf' if low is None else low}, "
                               f"{'inf' if high is None else high}{right}.")

    def _flag(self, option: str) -> None:
        if not isinstance(getattr(self, option), bool):
            self._fail(option, "expected true or false.")

"""Errors raised while finding, reading or matching weights. Each message names the fix.

The same mistake is fixed differently from Python (``create_model(NAME, depth=2, weights=...)``)
and from the command line (``--model NAME --override depth=2``): a :class:`Fix` records what to
change, and each front end renders it in its own words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Fix:
    """A structured suggestion attached to a :class:`CheckpointError`."""

    model: Optional[str] = None  # a variant name to build instead
    overrides: dict = field(default_factory=dict)  # architecture fields to set on it
    name_needed: bool = False  # the source does not say which variant it is
    from_config: bool = False  # build the model from the source's own configuration
    not_strict: bool = False  # loading the matching keys only would work

    def python(self) -> str:
        if self.from_config:
            return "use flashdino.from_pretrained(SOURCE) to build the model from the source's own config"
        if self.model or self.overrides or self.name_needed:
            args = [repr(self.model) if self.model else "NAME"]
            args += [f"{k}={v!r}" for k, v in self.overrides.items()]
            return f"build a matching model: flashdino.create_model({', '.join(args)}, weights=...)"
        if self.not_strict:
            return "pass strict=False to load the matching keys only"
        return ""

    def cli(self) -> str:
        if self.from_config:
            return "leave out --model and --override: the architecture is then read from the weights' own config"
        if self.model or self.overrides or self.name_needed:
            parts = [f"--model {self.model or 'NAME'}"] + [f"--override {k}={_cli_value(v)}"
                                                           for k, v in self.overrides.items()]
            return f"pass {' '.join(parts)}"
        return ""


def _cli_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model."""

    def __init__(self, message: str, fix: Optional[Fix] = None):
        self.problem = message
        self.fix = fix
        super().__init__(message)

    def _render(self, advice: str) -> str:
        if not advice:
            return self.problem
        return f"{self.problem}\n  to fix: {advice}" if "\n" in self.problem else f"{self.problem}; {advice}"

    def __str__(self) -> str:
        return self._render(self.fix.python() if self.fix else "")

    def cli_message(self) -> str:
        """The message with command-line advice instead of Python advice."""
        return self._render(self.fix.cli() if self.fix else "")


class WeightsUnavailableError(RuntimeError):
    """Weights cannot be obtained (gated, offline, missing, timed out); the message says what to do."""


class NonFiniteWeightsWarning(UserWarning):
    """A checkpoint holds inf / NaN weights: every output that touches them will be NaN or inf."""


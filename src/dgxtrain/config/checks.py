"""Range checks next to the fields they check: the base of every config schema."""

from __future__ import annotations

from typing import ClassVar

from dgxtrain.errors import ConfigError


class Checked:
    """Range checks for a schema's fields, each naming its full key and the fix."""

    section: ClassVar[str] = ""

    def require(self, name: str, ok: bool, problem: str, fix: str) -> None:
        if not ok:
            key = f"{self.section}.{name}" if self.section else name
            raise ConfigError(key, getattr(self, name), problem, fix)

    def positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            bound = ("seconds > 0" if name.endswith("_s") else
                     "an integer >= 1" if isinstance(value, int) else "a number > 0")
            self.require(name, value > 0, "must be positive",
                         f"set {self.section}.{name} to {bound}")

    def not_negative(self, *names: str) -> None:
        for name in names:
            self.require(name, getattr(self, name) >= 0, "must not be negative",
                         f"set {self.section}.{name} >= 0 (0 disables it)")

    def one_of(self, name: str, *choices: str) -> None:
        self.require(name, getattr(self, name) in choices, f"unknown {name}",
                     "use " + " or ".join(f"{self.section}.{name}={c}" for c in choices))

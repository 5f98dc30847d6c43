"""One line for a bad setting: our own ConfigError, or what Hydra and OmegaConf raise
(an unknown key, a wrong type, a missing group option), with a fix to try."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Iterator

from hydra.errors import HydraException, InstantiationException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)


class ConfigError(ValueError):
    """A bad setting: one line naming the key, the value and the fix."""

    def __init__(self, key: str, value: object, problem: str, fix: str):
        super().__init__(f"{key}={value}: {problem}; fix: {fix}")
        self.key = key


def first_line(e: BaseException) -> str:
    """`TypeName: the message's first line`, for an error quoted inside one line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@contextlib.contextmanager
def constructing(group: str, node: DictConfig) -> Iterator[None]:
    """A class that rejects the config's arguments is a config error, named as one."""
    try:
        yield
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, ConfigError):  # a class of ours that names the setting itself
            raise cause from e
        if isinstance(cause, TypeError):  # the arguments: unknown, missing, of a wrong type
            raise ConfigError(f"{group}._target_", node.get("_target_"),
                              f"its constructor failed ({first_line(cause)})",
                              f"make the {group}.* keys match that class's arguments") from e
        raise ConfigError(f"{group}._target_", node.get("_target_"), f"raised "
                          f"{first_line(cause)}", f"fix what it names (it was given the "
                          f"{group}.* keys as its arguments)") from e


class DistEnvError(RuntimeError):
    """The launcher's environment is inconsistent; the message says what to set."""


class DataError(RuntimeError):
    """The data failed while training (a loader worker died): one line with the fix."""


def _valid_keys(ex: OmegaConfBaseException) -> list[str]:
    node = getattr(ex, "parent_node", None)
    if isinstance(node, DictConfig):
        return [str(k) for k in node.keys() if k != "hydra"]
    obj = getattr(ex, "object_type", None)
    if obj is not None and dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    return []


def _omegaconf_line(ex: OmegaConfBaseException) -> str:
    key = ex.full_key or str(ex.key)
    if "does not support deletion" in str(ex.msg):  # `~key` of a schema's own field
        return (f"~{key}: cannot be deleted, the schema requires it; fix: set {key} to "
                "something else instead")
    if isinstance(ex, (ConfigKeyError, ConfigAttributeError)):
        valid = _valid_keys(ex)
        guess = difflib.get_close_matches(str(ex.key), valid, n=1)
        prefix = key.rpartition(".")[0]
        name = lambda k: f"{prefix}.{k}" if prefix else k  # noqa: E731
        fix = (f"did you mean {name(guess[0])}?" if guess
               else f"use one of {', '.join(name(k) for k in valid)}" if valid
               else "check the spelling against the README's config reference")
        return f"{key}: unknown key; fix: {fix}"
    if isinstance(ex, ValidationError):
        problem = str(ex.msg).splitlines()[0]
        return f"{key}={ex.value!r}: wrong type ({problem}); fix: give a value of the schema's type"
    return f"{key}: {str(ex.msg).splitlines()[0]}"


def caused_by(ex: BaseException, kind: type) -> bool:
    """Whether `ex` or an exception it was raised from (or during) is a `kind`."""
    seen: list[BaseException] = []
    while ex is not None and ex not in seen:
        if isinstance(ex, kind):
            return True
        seen.append(ex)
        ex = ex.__cause__ or ex.__context__
    return False


def describe_error(ex: BaseException) -> str | None:
    """One line for a bad config or override, or None if `ex` is not a config error."""
    seen: list[BaseException] = []
    while ex is not None and ex not in seen:
        seen.append(ex)
        ex = ex.__cause__ or ex.__context__
    for ex in seen:  # our own messages first, wherever Hydra wrapped them
        if isinstance(ex, (ConfigError, DistEnvError)):
            return str(ex)
    for ex in seen:
        if isinstance(ex, MissingConfigException) and ex.missing_cfg_file:
            group, _, choice = ex.missing_cfg_file.rpartition("/")
            names = [o for o in (ex.options or []) if not o.endswith("_schema")]
            guess = difflib.get_close_matches(choice, names, n=1)
            fix = (f"did you mean {group}={guess[0]}? or choose one of {', '.join(names)}"
                   if guess else f"choose one of {', '.join(names)}" if names
                   else "check conf/ for the options")
            if group == "model":
                fix += ", or set model._target_ to your own nn.Module class"
            return f"{group or 'config'}={choice}: no such config file; fix: {fix}"
        if isinstance(ex, OmegaConfBaseException) and getattr(ex, "full_key", None):
            return _omegaconf_line(ex)
    first = seen[0]
    text = str(first)
    if text.startswith("Error parsing override"):
        return (f"{text.splitlines()[0]}; fix: quote a value with spaces or special "
                "characters, whole override in single quotes: 'key=a b' (or key=\"a b\" "
                "inside them)")
    if isinstance(first, (HydraException, OmegaConfBaseException)):
        lines = [ln.strip() for ln in str(first).splitlines() if ln.strip()]
        return "; ".join(lines[:2]) if lines else type(first).__name__
    return None

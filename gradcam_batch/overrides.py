"""Command-line overrides checked before Hydra composes them, so a typo is one line naming the
key and its closest match (exit code 2), not a Hydra error report.

Only what this project defines is checked: its groups, their options and their keys.
Hydra's own settings (`hydra.*`, `hydra/launcher=...`) and flags go through untouched.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from gradcam_batch import UserError
from gradcam_batch.config import Config

# Flags of Hydra's command line that take a value in the next argument.
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun",
                     "--info", "-i"}


def _fields_of(group: str) -> list[str]:
    node = getattr(Config(), group)
    return [field.name for field in dataclasses.fields(node)]


def _options(config_dir: Path, group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir / group).glob("*.yaml"))


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def override_tokens(argv: list[str]) -> list[str]:
    """The key=value arguments, without Hydra's flags and their values."""
    tokens, skip = [], False
    for argument in argv:
        if skip:
            skip = False
            continue
        if argument.startswith("-"):
            skip = argument in _FLAGS_WITH_VALUE
            continue
        if "=" in argument:
            tokens.append(argument)
    return tokens


def check_overrides(argv: list[str], config_dir: str | Path) -> None:
    """Raise UserError for the first override naming a group, option or key that does not exist."""
    config_dir = Path(config_dir)
    groups = [field.name for field in dataclasses.fields(Config)]
    for token in override_tokens(argv):
        key, value = token.split("=", 1)
        key = key.lstrip("+~")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        parts = key.split(".")
        group = parts[0]
        if group not in groups:
            raise UserError(f"{key!r} is not a setting of gradcam-batch{_suggest(group, groups)} "
                            f"(groups: {', '.join(groups)}; see gradcam-batch --help)")
        if len(parts) == 1:
            options = _options(config_dir, group)
            # a sweep (a,b) or a Hydra function (choice(...)) is for Hydra to expand
            if value and "," not in value and "(" not in value and value not in options:
                raise UserError(f"{group}={value!r} is not an option of {group}{_suggest(value, options)} "
                                f"(options: {', '.join(options)})")
            continue
        fields = _fields_of(group)
        if len(parts) > 2 or parts[1] not in fields:
            keys = [f"{group}.{name}" for name in fields]
            raise UserError(f"{key!r} is not a setting of gradcam-batch{_suggest(key, keys)} "
                            f"(the {group} keys: {', '.join(fields)})")

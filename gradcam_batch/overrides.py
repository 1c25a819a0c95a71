"""Command-line overrides checked before Hydra composes them, so a typo is one line naming the
key and its closest match (exit code 2), not a Hydra error report.

Only what this project defines is checked: its groups, their options and their keys.
Hydra's own settings (`hydra.*`, `hydra/launcher=...`) and flags go through untouched.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
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


def _refuse_repeated_keys(tokens: list[str]) -> None:
    """Hydra keeps the last of a key given twice; the shell turns an unquoted
    `data.shards=/d/shard-{0000..0003}.tar` into four of them, so three quarters of the data
    would be dropped without a word."""
    values: dict[str, list[str]] = {}
    for token in tokens:
        key, value = token.split("=", 1)
        values.setdefault(key.lstrip("+~"), []).append(value)
    for key, given in values.items():
        if len(given) < 2:
            continue
        hint = ""
        if key == "data.shards":
            hint = (f"; if the shell expanded braces, quote them for Hydra: \"data.shards='{_brace_guess(given)}'\" "
                    "(braces expand as in WebDataset), or list the files: data.shards=[a.tar,b.tar]")
        raise UserError(f"{key} is given {len(given)} times on the command line ({', '.join(given[:3])}"
                        f"{', ...' if len(given) > 3 else ''}); give it once{hint}")


def _brace_guess(values: list[str]) -> str:
    """The brace pattern a shell most likely expanded into these values."""
    prefix = os.path.commonprefix(values)
    suffix = os.path.commonprefix([value[len(prefix):][::-1] for value in values])[::-1]
    middles = [value[len(prefix):len(value) - len(suffix)] for value in values]
    if all(middle.isdigit() for middle in middles):
        while prefix[-1:].isdigit():  # shard-{0000..0003}, not shard-000{0..3}
            prefix, middles = prefix[:-1], [prefix[-1] + middle for middle in middles]
        return f"{prefix}{{{middles[0]}..{middles[-1]}}}{suffix}"
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def _check_types(tokens: list[str]) -> None:
    """A value of the wrong type (`data.batch_size=abc`, `cam.classes=[1e30]`) in one line, as
    the schema reads it, instead of Hydra's report over six lines with exit code 1."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    schema = OmegaConf.structured(Config)
    for token in tokens:
        key = token.split("=", 1)[0]
        if "." not in key or key.startswith(("+", "~", "hydra.")):
            continue
        try:
            override = parser.parse_override(token)
        except HydraException as error:
            raise UserError(f"{token!r} cannot be read ({_first_line(error)}); quote values with spaces or "
                            "special characters: \"key='value'\"") from None
        if override.is_sweep_override():
            continue  # each value of a sweep is checked when its job composes
        try:
            OmegaConf.update(schema, key, override.value(), merge=True)
        except (OmegaConfBaseException, ValueError, TypeError) as error:
            raise UserError(f"{token}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def check_overrides(argv: list[str], config_dir: str | Path) -> None:
    """Raise UserError for the first override naming a group, option or key that does not exist."""
    config_dir = Path(config_dir)
    groups = [field.name for field in dataclasses.fields(Config)]
    _refuse_repeated_keys(override_tokens(argv))
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
    _check_types(override_tokens(argv))

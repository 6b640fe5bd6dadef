"""Typed views of a job's free-form `config`, one per job type.

The schema leaves `config` open ("the structure depends on the job type"); these structs are what the
scheduler validates it against and what agents execute. Unknown keys are allowed so that a job can
carry settings for other tools, except inside `simulate` and `files`, where a typo would silently
change behaviour.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .codec import convert


class Simulate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Behaviour of a simulated node's fake executor; absent means healthy and long-running."""

    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    only_nodes: list[str] | None = None
    exit_code: int | None = None
    duration: Annotated[float, msgspec.Meta(ge=0)] | None = None
    hang: bool = False
    output: Annotated[str, msgspec.Meta(max_length=256)] = ""  # a line it prints every second (none if empty)

    def applies_to(self, node_id: str) -> bool:
        return self.only_nodes is None or node_id in self.only_nodes


class CommandConfig(msgspec.Struct, kw_only=True):
    """pipeline, query and update jobs: run `command` (an argv list, no shell) as a real process."""

    command: list[str] = []
    env: dict[str, str] = {}
    working_dir: str = ""
    simulate: Simulate | None = None


class ConfigFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str
    content: str
    mode: Annotated[int, msgspec.Meta(ge=0, le=0o7777)] = 0o644


class FilesConfig(msgspec.Struct, kw_only=True):
    """config jobs: write `files` atomically, relative to the agent's config root."""

    files: list[ConfigFile] = []
    simulate: Simulate | None = None


def command_config(config: dict[str, Any]) -> CommandConfig:
    return convert(config, CommandConfig, prefix="spec.config.")


def files_config(config: dict[str, Any]) -> FilesConfig:
    return convert(config, FilesConfig, prefix="spec.config.")


def simulate_config(config: dict[str, Any]) -> Simulate | None:
    raw = config.get("simulate")
    if raw is None:
        return None
    return convert(raw, Simulate, prefix="spec.config.simulate.")

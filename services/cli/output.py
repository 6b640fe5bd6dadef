"""Rendering API replies for people: aligned tables, short times, and exact JSON or YAML when asked."""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Sequence

import yaml


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def when(ts: dt.datetime | None) -> str:
    if ts is None:
        return ""
    return ts.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def as_yaml(raw: bytes) -> str:
    return yaml.safe_dump(json.loads(raw), sort_keys=False, default_flow_style=False).rstrip()


def command_line(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def emit(raw: bytes, output: str, render) -> None:
    """Print the API reply exactly (json), as YAML, or as a table made by `render()`."""
    if output == "json":
        print(raw.decode())
    elif output == "yaml":
        print(as_yaml(raw))
    else:
        print(render())


# -- explanations: dry-run plans, wave bars, failures ------------------------------------------------

WIDTH = 80  # columns a line of `rollout watch` fits when the terminal does not say


# Control characters (C0 but tab, DEL, C1) as `cat -v` shows them: what a node printed or said must not
# drive the reader's terminal.
_CONTROLS = {c: f"^{chr(c + 64)}" for c in range(32) if c != 9} | {127: "^?"} | {c: "?" for c in range(128, 160)}


def safe(text: str) -> str:
    return text.translate(_CONTROLS)


def shorten(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def value_text(value: object, width: int = 60) -> str:
    """A spec value on one line: a plain string bare, anything else as compact JSON."""
    if isinstance(value, str) and value and value == value.strip() and "\n" not in value:
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return shorten(text, width)


def change_line(change) -> str:
    """One SpecChange: `+ path: new`, `- path: old` or `~ path: old -> new`."""
    if change.change == "added":
        return f"+ {change.path}: {value_text(change.new)}"
    if change.change == "removed":
        return f"- {change.path}: {value_text(change.old)}"
    return f"~ {change.path}: {value_text(change.old, 36)} -> {value_text(change.new, 36)}"


def wave_sizes_text(sizes: Sequence[int]) -> str:
    """Wave sizes with runs folded: [1, 34, 34, 31] -> "1 + 2×34 + 31"."""
    parts: list[str] = []
    i = 0
    while i < len(sizes):
        j = i
        while j + 1 < len(sizes) and sizes[j + 1] == sizes[i]:
            j += 1
        run = j - i + 1
        parts.append(f"{run}×{sizes[i]}" if run > 2 else " + ".join([str(sizes[i])] * run))
        i = j + 1
    return " + ".join(parts)


def plan_lines(plan, selector: str) -> list[str]:
    """What a dry run found (a DryRunPlan), as `nomad job plan` tells it: nodes, waves, changes."""
    lines: list[str] = []
    ready = plural(plan.ready_nodes, "ready node")
    if plan.matched_nodes:
        more = f" and {plan.matched_nodes - len(plan.node_ids)} more" if plan.matched_nodes > len(plan.node_ids) else ""
        lines.append(f"nodes:   {plan.matched_nodes} of {ready} match {selector}: {', '.join(plan.node_ids)}{more}")
    else:
        lines.append(f"nodes:   none of {ready} matches {selector}")
        for reason in plan.no_match:
            lines.append(f"  why:   {reason}")
        lines.append("         the job would wait in state queued and start when a matching node joins")
    if plan.matched_disconnected:
        lines.append(f"         ({plural(plan.matched_disconnected, 'disconnected node')} "
                     f"{'matches' if plan.matched_disconnected == 1 else 'match'} too, and would get it on return)")
    if plan.waves:
        lines.append(f"waves:   {plan.strategy}, {plural(len(plan.waves), 'wave')}: {wave_sizes_text(plan.waves)} nodes")
    else:
        lines.append(f"waves:   {plan.strategy}, none until a node matches")
    if not plan.current_version:
        lines.append("changes: a new job")
    elif not plan.changes:
        lines.append(f"changes: none against version {plan.current_version} ({plan.current_state}): "
                     "the same spec, deployed again")
    else:
        lines.append(f"changes against version {plan.current_version} ({plan.current_state}):")
        lines += [f"  {change_line(c)}" for c in plan.changes]
    return lines


# Observed states of a wave's executions, by what they say about the wave's progress.
DONE_STATES = frozenset({"running", "completed"})
FAILED_STATES = frozenset({"failed"})
WAITING_STATES = frozenset({"not started"})


def wave_counts(states: dict[str, int]) -> tuple[int, int, int, int]:
    """(done, failed, in progress, not started) of one wave's per-state counts."""
    done = sum(n for s, n in states.items() if s in DONE_STATES)
    failed = sum(n for s, n in states.items() if s in FAILED_STATES)
    waiting = sum(n for s, n in states.items() if s in WAITING_STATES)
    return done, failed, sum(states.values()) - done - failed - waiting, waiting


def _wave_char(states: dict[str, int], started: bool) -> str:
    done, failed, busy, waiting = wave_counts(states)
    if failed:
        return "x"
    if not started or (not done and not busy):
        return "."
    return "#" if not busy and not waiting else "~"


def _wave_cell(states: dict[str, int], started: bool, width: int) -> str:
    """One wave in `width` characters: # done, x failed, ~ in progress, . not started (in that order)."""
    total = sum(states.values())
    if not started or total <= 0:
        return "." * width
    done, failed, busy, _ = wave_counts(states)
    x = -(-failed * width // total) if failed else 0  # a failure always shows
    d = min(width - x, done * width // total)
    b = min(width - x - d, -(-busy * width // total) if busy else 0)
    return "#" * d + "x" * x + "~" * b + "." * (width - d - x - b)


def wave_bar(waves: Sequence, width: int) -> str:
    """Every wave on one line of at most `width` characters: `[##|#~|..]`; each wave's cell is as wide
    as fits (up to 6), one character per wave when cells would not fit, several waves per character
    beyond that. WaveStatus-like items: .nodes, .started, .states."""
    n = len(waves)
    inner = max(1, width - 2)
    if n == 0:
        return "[]"
    cell = min(6, max((w.nodes for w in waves), default=1), (inner - (n - 1)) // n)
    if cell >= 2 or (cell == 1 and n * 2 - 1 <= inner):
        return "[" + "|".join(_wave_cell(w.states, w.started, cell) for w in waves) + "]"
    group = -(-n // inner)  # waves per character
    chars = []
    for start in range(0, n, group):
        part = waves[start: start + group]
        merged: dict[str, int] = {}
        for w in part:
            for state, count in w.states.items():
                merged[state] = merged.get(state, 0) + count
        chars.append(_wave_char(merged, any(w.started for w in part)))
    return "[" + "".join(chars) + "]"


def budget_text(max_nodes: int, max_percent: float) -> str:
    return f"more than {max_nodes} nodes or {max_percent:g}% fails the rollout"


def failure_text(f) -> str:
    """A NodeFailure (or an execution's failure) in one line: message, reason, exit code, last output."""
    text = f.message or f.state or "failed"
    extras = []
    if f.reason:
        extras.append(f"reason: {f.reason}")
    if f.exit_code is not None and f"code {f.exit_code}" not in text:
        extras.append(f"exit code {f.exit_code}")
    if extras:
        text += f" ({', '.join(extras)})"
    if f.output:
        text += f"; output: {shorten(f.output, 80)}"
    return text


def clock(ts: dt.datetime | None = None) -> str:
    """Local wall-clock time for live displays."""
    return (ts or dt.datetime.now()).strftime("%H:%M:%S")


class LiveBlock:
    """A few lines redrawn in place on a terminal (ANSI: back to the block's first line, clear below,
    write); on anything else, each changed block is written once as plain lines."""

    def __init__(self, stream, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.drawn = 0
        self.last: object = None

    def show(self, lines: list[str], key: object = None) -> None:
        """Draw `lines`; off a terminal only when `key` (default: the lines) differs from last time."""
        if self.tty:
            out = (f"\x1b[{self.drawn}F" if self.drawn else "") + "\x1b[J" + "\n".join(lines) + "\n"
            self.stream.write(out)
            self.drawn = len(lines)
        else:
            key = lines if key is None else key
            if key == self.last:
                return
            self.last = key
            self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

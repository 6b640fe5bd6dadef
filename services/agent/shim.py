"""The supervisor of one command: `python -I -m services.agent.shim [--control FD] [--cwd DIR] RUN_DIR -- ARGV...`

A command must outlive its agent (an agent killed with kill -9 comes back and re-adopts it), but only a
process's parent can collect its exit status. So the agent starts this small process as a session
leader (its pid is the process group to stop), the shim starts the command as its child, waits for it
and writes how it ended to `shoal-exit.json` in the run dir, whichever agent is around by then.

With the agent, over the control socket FD (when given):
1. The shim waits for "go", which the agent sends once the shim's pid is recorded in `shoal-run.json`.
   If the agent dies before that (end of file), the shim exits and starts nothing: no command ever
   runs that a restarted agent could not find.
2. It starts the command and answers "started <pid>", or "error <message>" if it could not (the agent
   reports a start error) and exits 127.
3. It waits for the command, writes the exit file atomically and exits with the command's code (128 + N
   for signal N, as a shell does).

Signals: SIGTERM to the process group stops the command, which has default dispositions, while the shim
lives on to record the result. The shim catches SIGTERM with a handler that does nothing rather than
ignoring it, because an ignored signal stays ignored across exec and the command would inherit that.
SIGKILL to the group ends both; the agent then knows it killed them.

stdin, stdout and stderr are the agent's choice (/dev/null, then the output file for both), inherited by
the command; the shim itself writes there only if it fails. `-I` keeps the command's environment
(PYTHONPATH, PYTHONHOME...) from changing the interpreter that runs the shim.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from services.agent.runstate import EXIT_FILE, ExitStatus, utcnow, write_struct

START_FAILED = 127


class Usage(Exception):
    pass


def parse(argv: list[str]) -> tuple[int | None, str, Path, list[str]]:
    """(control fd, working directory, run dir, command) from the shim's arguments."""
    if "--" not in argv:
        raise Usage("expected RUN_DIR -- COMMAND...")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    control: int | None = None
    cwd = ""
    positional: list[str] = []
    items = iter(options)
    for item in items:
        if item == "--control":
            control = int(next(items, "-1"))
        elif item == "--cwd":
            cwd = next(items, "")
        else:
            positional.append(item)
    if len(positional) != 1 or not command or (control is not None and control < 0):
        raise Usage("expected [--control FD] [--cwd DIR] RUN_DIR -- COMMAND...")
    return control, cwd, Path(positional[0]), command


def _ignore(signum: int, frame: object) -> None:
    """Stay alive to record how the command ended (see the module docstring for why not SIG_IGN)."""


def _wait_for_go(control: socket.socket) -> bool:
    data = b""
    while len(data) < 2:
        chunk = control.recv(2 - len(data))
        if not chunk:
            return False
        data += chunk
    return data == b"go"


def _answer(control: socket.socket | None, text: str) -> None:
    if control is not None:
        try:
            control.sendall(text.encode(errors="replace") + b"\n")
        except OSError:
            pass  # the agent is gone; the state file is enough for the next one
        control.close()


def main(argv: list[str] | None = None) -> int:
    try:
        control_fd, cwd, run_dir, command = parse(sys.argv[1:] if argv is None else argv)
    except (Usage, ValueError) as exc:
        print(f"shoal shim: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _ignore)
    control = socket.socket(fileno=control_fd) if control_fd is not None else None
    if control is not None and not _wait_for_go(control):
        return START_FAILED
    try:
        child = subprocess.Popen(command, cwd=cwd or None)
    except (OSError, ValueError) as exc:
        _answer(control, f"error {exc}")
        return START_FAILED
    _answer(control, f"started {child.pid}")
    code = child.wait()
    if code < 0:
        status = ExitStatus(signal=-code, ended_at=utcnow())
    else:
        status = ExitStatus(exit_code=code, ended_at=utcnow())
    write_struct(run_dir / EXIT_FILE, status)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())

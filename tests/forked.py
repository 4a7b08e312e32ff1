"""A Python process that imports some modules once and runs each piece of code it is given in a forked child of
itself: every piece starts from the same freshly imported state (a piece's patches of module globals, or the
modules it imports, end with its child), as in a new interpreter, without paying the imports again for each.

Used where a test needs a process of its own only for a fresh start (tests/serve/test_serve_kernels.py: Triton's
interpreter must be chosen before Triton is imported; tests/convert/test_import_layers.py: each lmforge module
imported on its own), not for anything the process itself does. Each piece is run as ``python -c`` runs its code
(in ``__main__``'s namespace: torch.compile looks names up there), its output (file descriptors 1 and 2) written to
a file; the child's exit status is 1 when the code raises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Reads one path a line, runs that file's code in a forked child (its output written to PATH.out), answers the
# child's exit status.
SERVER = textwrap.dedent("""
    import os, sys, traceback
    for name in sys.argv[1:]:
        __import__(name)

    for line in sys.stdin:
        path = line.strip()
        pid = os.fork()
        if pid == 0:
            fd = os.open(path + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            status = 0
            try:
                exec(compile(open(path).read(), path, "exec"), sys.modules["__main__"].__dict__)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
""")


class ForkedPython:
    """``run(code) -> (exit status, output)``, each ``code`` in a fork of one process that imported ``preload``
    (module names) under ``env``; files go to ``folder``. ``close()`` ends the process."""

    def __init__(self, folder: Path, preload: list[str], env: dict | None = None):
        self.folder, self.count = Path(folder), 0
        self.server = subprocess.Popen([sys.executable, "-c", SERVER, *preload], env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, code: str) -> tuple[int, str]:
        self.count += 1
        path = self.folder / f"code{self.count}.py"
        path.write_text(code)
        self.server.stdin.write(f"{path}\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        out = Path(f"{path}.out")
        out = out.read_text() if out.exists() else ""
        assert answer.strip(), f"the forking process ended (exit {self.server.poll()}): {out[-3000:]}"
        return int(answer), out

    def close(self) -> None:
        self.server.stdin.close()
        try:
            self.server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, 9)
            self.server.wait()

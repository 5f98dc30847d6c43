"""`python -m dgxtrain ARGS` once per case, each in a process forked from this one after it
imported the CLI: the CLI's own exit code and output, without importing torch each time.

    python -m tests.forked_cli CASES_JSON OUT_JSON
CASES_JSON: [{"argv": [...], "env": {...}}, ...]; OUT_JSON gets [{"code", "output"}, ...],
"code" null where a case ran past its timeout (it was killed)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback

import dgxtrain.__main__ as cli

TIMEOUT_S = 60


def _child(argv: list[str], env: dict[str, str], out_fd: int) -> None:
    code = 1
    try:
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["dgxtrain", *argv]
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # what a real process would print before exiting 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(argv: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:
            _child(argv, env, out.fileno())
        end, code = time.monotonic() + TIMEOUT_S, None
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        out.seek(0)
        return {"code": code, "output": out.read().decode(errors="replace")}


if __name__ == "__main__":
    cases = json.loads(open(sys.argv[1]).read())
    results = [run(c["argv"], c["env"]) for c in cases]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)

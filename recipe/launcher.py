"""torchrun, with its own report kept in a log file: ``python -m recipe.launcher --log FILE [torchrun args]``.

``run_train.sh`` launches the ranks through this module instead of ``python -m torch.distributed.run``.
The ranks' output is untouched (they inherit this process's stdout and stderr, as under torchrun). What
changes is torchrun's own output: its warnings ("Sending process ... closing signal SIGTERM"), its
``ChildFailedError`` report (about 30 lines after any failed rank, bad input included) and the traceback
of its ``SignalException`` when a SIGTERM stopped the job cleanly (exit 75) go to ``--log`` instead of
the terminal. ``run_train.sh`` then prints one line per failure, from the ranks' status records
(``recipe/exit_status.py``), naming that file.

Exit code: 0 when every rank succeeded, else 1 (``run_train.sh`` takes the real one from the records),
or 128 + the signal that stopped torchrun.
"""

from __future__ import annotations

import logging
import sys
import traceback

__all__ = ["main"]


def _log_to(path: str) -> logging.Handler:
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # torchrun's loggers are all under torch.distributed (elastic agent, multiprocessing, rendezvous).
    # Set on the parent and not propagated: torch's own handlers on "torch" never see these records.
    for name in ("torch.distributed", "torch.distributed.elastic"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    return handler


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--log":
        print("usage: python -m recipe.launcher --log FILE [torchrun arguments]", file=sys.stderr)
        return 2
    path, argv = argv[1], argv[2:]
    handler = _log_to(path)

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    def write(text: str) -> None:
        with open(path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        handler.flush()
        write(f"torchrun: {type(e).__name__}: {e.name} failed\n{e.format_msg()}")
        return 1
    except SignalException as e:
        handler.flush()
        write(f"torchrun stopped by {e.sigval.name}:\n" + traceback.format_exc())
        return 128 + int(e.sigval)
    except Exception:
        handler.flush()
        write(traceback.format_exc())
        print(f"run_train.sh: torchrun failed; its report: {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

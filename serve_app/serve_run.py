"""Ray's `serve run`, stoppable with SIGINT whoever started it (what scripts/serve.sh runs).

`serve run` shuts Serve down gracefully (`serve.shutdown()`: replicas drain, the
registrar withdraws the models from the AI network's nodes) only on a
KeyboardInterrupt. A shell starts a background job with SIGINT ignored, and Python
keeps a signal that was ignored at startup ignored, so a `serve run` started from a
script, `nohup` or `&` could not be stopped gracefully at all. scripts/serve.sh runs
it through this module and turns its own SIGTERM or SIGINT into one SIGINT to it.

    python -m serve_app.serve_run CONFIG [serve run's options...]
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> None:
    # First: importing Ray takes a second or more, and a SIGINT still ignored meanwhile is lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from ray.serve.scripts import cli  # Ray's own `serve` command line: `serve run` exactly as it is

    cli.main(args=["run", *(sys.argv[1:] if argv is None else argv)], prog_name="serve")


if __name__ == "__main__":
    main()

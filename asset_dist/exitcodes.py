"""Exit codes every asset_dist command and launcher agrees on (slurm/common.sh reads them from here).

No imports: the batch scripts evaluate `python -m asset_dist.exitcodes` before any heavy work."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a run that finished but found a problem (e.g. `evaluate edits` saw changed outside pixels)
EXIT_BAD_INPUT = 2  # bad config or input: the message names the key or file; never requeued
EXIT_NONFINITE = 3  # non-finite loss: nothing was saved over the last good checkpoint; never requeued
EXIT_REQUEUE = 99  # checkpoint written on a signal: requeue me

CODES = {name: value for name, value in globals().items() if name.startswith("EXIT_")}


def shell() -> str:
    """`EXIT_REQUEUE=99`-style lines for `eval` in a shell script."""
    return "".join(f"{k}={v}\n" for k, v in CODES.items())


if __name__ == "__main__":
    print(shell(), end="")

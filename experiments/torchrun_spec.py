"""What torchrun starts for each rank of a ``--nproc-per-run N`` run (experiments.executor):

    python -m torch.distributed.run --standalone --nproc_per_node N -m experiments.torchrun_spec FOLDER

``FOLDER/job.json`` (written by the executor's worker) holds the spec, the run to resume and the
tracking URI; each rank trains it with the executor's own code (:func:`experiments.executor.rank_main`)
and writes ``FOLDER/rank_R.json``, which the worker reads back.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from experiments.executor import rank_main

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m experiments.torchrun_spec FOLDER (run by torchrun for the executor)", file=sys.stderr)
        return 2
    return rank_main(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())

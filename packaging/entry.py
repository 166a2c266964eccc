"""The bundle's entry point: the `model-studio` command (studio.cli.main).

`model-studio __worker__` runs a pipeline worker (studio.jobs.worker_command): a frozen executable
has no `python -m studio.worker`.
"""

import multiprocessing
import sys

from studio.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())

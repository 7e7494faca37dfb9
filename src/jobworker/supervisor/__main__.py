"""`python -m jobworker.supervisor`: the job supervisor as the server starts it (without
the command line's modules; `jobworker supervise` runs the same)."""

import sys

from jobworker.supervisor.run import main

sys.exit(main())

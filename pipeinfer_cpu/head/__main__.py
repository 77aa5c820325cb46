"""`python -m pipeinfer_cpu.head`: how mpiexec starts rank 0 of a job that the user-facing process runs."""

import sys

from pipeinfer_cpu.head.job import main

sys.exit(main())

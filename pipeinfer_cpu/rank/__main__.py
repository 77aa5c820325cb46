"""`python -m pipeinfer_cpu.rank`: how mpiexec starts every rank but the head."""

import sys

from pipeinfer_cpu.rank.main import main

sys.exit(main())

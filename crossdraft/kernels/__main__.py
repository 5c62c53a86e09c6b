"""`python -m crossdraft.kernels`: build and check crossdraft's CPU kernel (see the package docstring)."""
import sys

from . import main

sys.exit(main())

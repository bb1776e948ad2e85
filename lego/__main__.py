"""`python -m lego ...` is `lego-run ...`; under torchrun: `torchrun --nproc_per_node=2 -m lego ...`."""

import sys

from lego.cli import main

sys.exit(main())

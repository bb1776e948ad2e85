"""`python -m lego ...` is `lego-run ...`; under torchrun: `torchrun --nproc_per_node=2 -m lego ...`."""

from lego.cli import main

main()

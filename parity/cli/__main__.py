"""`python -m parity.cli`: the `parity` command."""

from parity.cli import main

main()

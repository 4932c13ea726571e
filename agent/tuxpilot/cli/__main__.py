"""`python -m tuxpilot.cli`: the `tuxpilot` command."""

from tuxpilot.cli import main

main()

"""`python -m jobworker` runs the CLI."""

from jobworker.cli import main

main()

"""`python -m bigseg` runs the command-line interface."""
from bigseg.cli import main

main()

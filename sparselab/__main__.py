"""`python -m sparselab` is the `sparselab` command."""
from sparselab.cli import main

main()

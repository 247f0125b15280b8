"""``python -m align.cli`` runs the command line."""

from align.cli import main

main()

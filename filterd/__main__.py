"""Allow `python -m filterd`."""

from filterd.cli import main

main()

"""``python -m copydet <command>``: the same as ``copydet <command>``."""

from copydet.cli import main

main()

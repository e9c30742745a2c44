"""``python -m pipeline <command>``: the same as ``copydet <command>``."""

from pipeline.commands import main

main()

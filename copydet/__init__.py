"""The ``copydet`` command line (``copydet.cli``): the top of the package."""

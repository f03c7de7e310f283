"""The ``densedet`` command's verbs, one module each: ``add_parser(subparsers)`` registers the verb
(its flags and help) and the function it runs. ``densedet/cli.py`` assembles them into the command.

These modules print, parse arguments and plot; a program that uses densedet imports the library
(``densedet.predict``, ``densedet.analysis``, ``densedet.export``, ``densedet.evaluation``, ...)
instead. ``bench`` and ``ablate`` are measuring tools and live here whole.
"""

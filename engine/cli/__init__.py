"""The `tunebench` command: main.py dispatches to one module per subcommand.

Imports: any wing, and tunebench.tui (main.py opens the workbench). Nothing imports cli; the
console script and `python -m tunebench.engine.cli.main` run it.
"""

"""The `medlens` command line: one click group (`group.py`) and a module per family of commands.

Commands only gather a request and print; the work is done by `medlens.pipeline` and the library.
"""

"""Puts the SDK and the bank app on sys.path (the tests run without
installing anything: python3 -m unittest discover -s plugins/python/tests)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for rel in ("../refold-sdk", "../bank"):
    path = os.path.normpath(os.path.join(HERE, rel))
    if path not in sys.path:
        sys.path.insert(0, path)

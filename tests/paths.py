"""Where things are, for test files at any depth of tests/: the repository and tests/ itself."""

import os

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

"""tests/security: attacks on mahole as regression tests.

The helpers of tests/ (aio_helpers, udp_helpers, ...) are imported by module name, as in the
rest of the suite; this puts tests/ on the path however these tests are collected.
"""

import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

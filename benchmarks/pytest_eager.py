"""A pytest plugin for the GPU machine: prints each test's outcome and a failure's traceback the
moment it happens, so a run that a time limit cuts still names what failed and why (pytest's own
summary comes only at the end). Used by `run_gpu.sh recheck`:

    PYTHONPATH=src:benchmarks python3 -m pytest -p pytest_eager ...
"""

import sys
import time

_started: dict[str, float] = {}


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = time.time()


def pytest_runtest_logreport(report):
    if report.when != "call" and not report.failed:
        return
    seconds = time.time() - _started.get(report.nodeid, time.time())
    sys.stderr.write(
        f"\n### {report.outcome.upper()} {report.nodeid} ({report.when}, {seconds:.1f}s)\n"
    )
    if report.failed:
        sys.stderr.write(report.longreprtext[-2500:] + "\n")
    sys.stderr.flush()

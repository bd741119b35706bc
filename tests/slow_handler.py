"""A test handler: `overview`, after a fixed sleep. Registered only where this module is imported
(tests preload it into the node and the workers), so a job lasts long enough to kill its worker
in the middle, and the scale-out benchmark has a handler bound by time, not CPU."""
from __future__ import annotations

import time

from pydantic import Field

from handlers.overview import Overview, OverviewParams
from node.handler_api import register


class SlowParams(OverviewParams):
    sleep_s: float = Field(0.0, ge=0, le=600)


@register
class SlowOverview(Overview):
    name = "test-slow-overview"
    version = "1.0.0"
    Params = SlowParams

    def run(self, inp, progress):
        deadline = time.monotonic() + self.params.sleep_s
        while (left := deadline - time.monotonic()) > 0:
            progress(0.0, f"sleeping {left:.1f} s")
            time.sleep(min(left, 0.5))
        return super().run(inp, progress)


# `python -c PRELOAD node-args…`: run the hilum command line with this handler registered.
PRELOAD = "import sys, tests.slow_handler; from node.cli import main; sys.exit(main())"

"""What the node's worker API (node/web/worker_api.py) and a remote worker (node/jobs/remote.py) agree on."""
from __future__ import annotations

import struct

TICKET = "x-hilum-ticket"  # the attempt's secret ticket, from the Celery task
WORKER = "x-hilum-worker"  # the worker's name, for job histories and the audit trail
FRAME = struct.Struct(">IQ")  # input stream: (series position, length), then the instance's bytes

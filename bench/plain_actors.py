"""The plain-job worker module: ``python -m dramatiq bench.plain_actors``.

Declares ``bench.plain_job``'s actor on a stock Redis broker built from ``BROKER_URL`` and makes
it Dramatiq's global broker, as a plain Dramatiq application does at import. Only Dramatiq
imports this module; a benchmark sends through ``bench.plain_job.declare``.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.plain_job import declare

broker = RedisBroker(url=os.environ["BROKER_URL"])
dramatiq.set_broker(broker)
plain_send_email = declare(broker)

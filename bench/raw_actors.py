"""The baseline worker module: ``python -m dramatiq bench.raw_actors``.

Declares the stock actors of ``bench.stock_actors`` on a stock Dramatiq broker built from
``BROKER_URL`` and makes it Dramatiq's global broker, as a plain Dramatiq application does at
import. Only Dramatiq imports this module; a benchmark sends through ``bench.stock_actors``.
"""

from __future__ import annotations

import os

import dramatiq

from bench.stock_actors import declare, stock_broker

raw = declare(stock_broker(os.environ["BROKER_URL"]))
dramatiq.set_broker(raw.broker)
noop, slow = raw.noop, raw.slow

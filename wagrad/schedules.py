"""Simulation of time: seeded NumPy tables (who is active, who pushes, with what
staleness, which steps end a round) of which the jitted step reads one row per step
(design.md, One clock).

* worker speeds and drops: :func:`speed_schedule`, :func:`straggler_speeds`,
  :func:`drop_workers`;
* asynchronous arrivals: :func:`softsync_schedule` (n-softsync),
  :func:`async_easgd_schedule`, :func:`async_report_steps` (the shared
  ``any_exchange=`` flag per step);
* rounds and sample orders: :func:`uneven_round_steps` (LSGD's uneven local steps),
  :func:`wasgd_plus_sample_order`.
"""

from wagrad._src.multi_leader import uneven_round_steps
from wagrad._src.schedules import drop_workers, speed_schedule, straggler_speeds
from wagrad._src.simulated_async import async_easgd_schedule, async_report_steps
from wagrad._src.staleness import softsync_schedule
from wagrad._src.sample_order import wasgd_plus_sample_order

__all__ = ["async_easgd_schedule", "async_report_steps", "drop_workers", "softsync_schedule",
           "speed_schedule", "straggler_speeds", "uneven_round_steps",
           "wasgd_plus_sample_order"]

"""Every write of the inference app."""

from inference.services.callbacks import (
    job_callback_deliver,
    job_callback_record,
    job_callbacks_sweep,
)
from inference.services.jobs import (
    concurrency_slots_sweep,
    job_cancel,
    job_settle,
    job_start,
    job_submit,
)

__all__ = [
    "concurrency_slots_sweep",
    "job_callback_deliver",
    "job_callback_record",
    "job_callbacks_sweep",
    "job_cancel",
    "job_settle",
    "job_start",
    "job_submit",
]

"""Every write of the inference app."""

from inference.services.jobs import job_cancel, job_settle, job_start, job_submit

__all__ = ["job_cancel", "job_settle", "job_start", "job_submit"]

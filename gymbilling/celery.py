"""The Celery application. Workers start with `celery -A gymbilling worker`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gymbilling.settings.local")

app = Celery("gymbilling")
# Every CELERY_* Django setting configures the app (see settings/base.py).
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

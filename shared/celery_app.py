"""The Celery app alone, for Celery's own tools, built from the same settings as producers and workers:

    celery -A shared.celery_app inspect active        # each worker's running task, with its job id
    celery -A shared.celery_app flower                 # (pip install flower) workers, tasks, queues live

Importable without torch and without a database: it reads ARCHFARM_BROKER_URL and ARCHFARM_QUEUE only, and
holds the transport options (priority steps, queue separator) that the workers use.
"""

from __future__ import annotations

from shared.broker import make_celery
from shared.config import get_settings

app = make_celery(get_settings())

"""Settings shared by every environment.

Every value that differs between machines comes from the environment through
django-environ; `.env.example` lists them all. An integration is on only when
its variable is set.
"""

import math
from datetime import timedelta
from pathlib import Path

import environ
from celery.schedules import crontab

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
# A developer's `.env` is read when present; the process environment wins.
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="insecure-dev-key-change-me")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "accounts",
    "metering",
    "inference",
    "gymbilling",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # /static/: the admin's and the API docs' files (see STATIC_URL).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "gymbilling.middleware.ApiErrorMiddleware",
    "accounts.cache.CacheScopeMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "gymbilling.urls"
WSGI_APPLICATION = "gymbilling.wsgi.application"
ASGI_APPLICATION = "gymbilling.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/gymbilling"),
}
# Services own their transactions (STYLE.md rule 6).
DATABASES["default"]["ATOMIC_REQUESTS"] = False
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # Lets psycopg keep prepared statements. Django's own queries bind on the
    # client and never prepare; the few statements every inference request
    # runs (accounts/sql.py: the ledger's fast path, the job row) bind on the
    # server and prepare, which halves their cost in PostgreSQL. Behind a
    # transaction-pooling PgBouncer older than 1.21, set
    # DATABASE_PREPARED_STATEMENTS=false. The advisory locks held across Stripe
    # calls need nothing there: each lives in a transaction of its own
    # (gymbilling/locks.py session_lock; README, "Behind a transaction-pooling
    # PgBouncer", for the pool's size).
    # Do not turn on OPTIONS["server_side_binding"] for Django's queries as they
    # are: tried on 2026-12-01, a prepared `remaining - $1` took a later
    # 12,500,000,000 as a 32-bit integer and wrapped (a lot's remaining rose
    # past its amount; the CHECK constraint refused it). The fast path casts
    # every parameter (::bigint) for this reason.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("prepare_threshold", 5)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Outgoing email (invitations, verification links): EMAIL_URL, e.g.
# smtp+tls://user:password@smtp.example.com:587 (django-environ's email URL).
# Unset, each email is written to the process's output instead of being sent to
# an SMTP server that is not there.
vars().update(env.email_url("EMAIL_URL", default="consolemail://"))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="GymBilling <no-reply@localhost>")

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

STATIC_URL = "static/"
# The app serves its static files itself (WhiteNoise), found in the installed
# apps as it starts (the dashboard, the admin, the API docs), and with no
# `collectstatic` step there is none for an operator to forget. A deployment
# with a CDN or a web server in front may still collect them: STATIC_ROOT says
# where (unset, WhiteNoise has no folder to serve besides the apps').
STATIC_ROOT = env.str("STATIC_ROOT", default="") or None
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # API views set their own (accounts.api_base.OrgApiView).
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "accounts.errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "GymBilling API",
    "DESCRIPTION": "Credits, billing, metered inference and the credit marketplace.",
    "VERSION": "1.0.0",
    # PATCH bodies are validated in full (a role change needs its role), so
    # document them as such rather than as all-optional "Patched" components.
    "COMPONENT_SPLIT_PATCH": False,
    # Swagger UI from the app's own static files (drf-spectacular-sidecar), not
    # a CDN: /api/docs/ works wherever the app is reachable.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "MemberRoleEnum": ["owner", "admin", "billing", "member"],
        "MessageRoleEnum": ["system", "user", "assistant", "developer"],
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        # Documents the shared error shape and statuses on every /api/v1/ operation.
        "gymbilling.openapi.add_error_responses",
    ],
}

# How long an inference job may run (INFERENCE_JOB_DEADLINE_SECONDS, under
# Inference below) sets the defaults of the settings that must outlast a run:
# the broker's visibility timeout and a hold's life (and, through it, a
# concurrency slot's lease). Raising it alone raises them with it; one set
# explicitly and too short is a `manage.py check` warning
# (inference/checks.py). The web app, every worker and beat must read the
# same values: the web app places the holds the workers start jobs under.
_JOB_RUN_S = max(0.0, env.float("INFERENCE_JOB_DEADLINE_SECONDS", default=300.0))

# --- Celery -----------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=CELERY_BROKER_URL)
# On a Redis broker, kombu's Redis transport keeping its Redis client
# (gymbilling/broker.py); any other broker, kombu's transport for its scheme.
if CELERY_BROKER_URL.split("://", 1)[0].lower() in ("redis", "rediss"):
    CELERY_BROKER_TRANSPORT = "gymbilling.broker:Transport"
# A task is acknowledged only after it ran, and a worker that dies mid-task
# hands it back: delivery is at least once, so every task is idempotent.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A worker holds at most as many messages as it runs (its concurrency times
# this): with late acknowledgement a message counts against the prefetch
# until its task has ended, so at 1 a worker takes its next message only
# when a slot is free, and takes it then by queue precedence (the broker's
# queue_order_strategy, below). Above 1 it would take batch jobs ahead into
# its own buffer, where a priority job that arrives next waits behind them
# (and a dead worker's buffer waits out the visibility timeout). Taking one
# message when a slot frees costs a BRPOP round trip to Redis, well under a
# millisecond, against jobs that run for tenths of seconds to minutes: no
# throughput is lost by not buffering.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A message a worker took but never acknowledged (the whole worker died, not
# only the child that ran it: reject_on_worker_lost hands that back at once)
# goes back to its queue after this long, on kombu's Redis transport. Longer
# than a job runs and settles (the start margin, inference.services.jobs), or
# a running job's message would come back while it runs; well inside a
# hold's life (METERING_HOLD_TTL_SECONDS), so that the job it carries is
# still run: a job whose hold expires within the start margin is never
# started, and ends expired, unbilled. By default 30 minutes, or three runs.
#
# A worker on several queues takes the first of them, in its -Q order, that
# has a message: kombu's Redis transport asks for them in one BRPOP, which
# answers from the first non-empty list named. By default kombu rotates the
# queue it just took from to the end of that list (round robin), so a batch
# backlog took every other slot from a stream of priority jobs that pay more
# to go first; "priority" keeps the order fixed (kombu.utils.scheduling:
# priority_cycle). Celery adds the queues in -Q order, so the worker's -Q
# is the precedence (README: celery, email and callbacks, then
# inference.priority, inference.standard, inference.batch). A queue added
# at run time (`celery control add_consumer`) comes last. Redis brokers
# only (gymbilling.broker.Transport is kombu's); on any other broker, give
# each queue workers of its own.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env.int(
        "CELERY_VISIBILITY_TIMEOUT_SECONDS", default=max(1800, math.ceil(3 * _JOB_RUN_S))
    ),
    "queue_order_strategy": "priority",
}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_EXPIRES = timedelta(hours=1)
CELERY_TIMEZONE = "UTC"
# Inference jobs go to the queue of their priority; a worker on several of
# them takes them in its -Q order (queue_order_strategy, above), and workers
# per queue isolate them completely.
CELERY_TASK_ROUTES = {
    "inference.tasks.job_run": {"queue": "inference.standard"},
    # Email on a queue of its own (accounts.tasks.EMAIL_QUEUE), which a worker must consume.
    "accounts.tasks.email_send_task": {"queue": "email"},
    # Job callbacks too (inference.tasks.CALLBACK_QUEUE): each attempt may wait on a
    # customer's server for up to INFERENCE_CALLBACK_TIMEOUT_SECONDS, and only other
    # callbacks may wait behind it, never inference jobs or billing.
    "inference.tasks.job_callback_deliver_task": {"queue": "callbacks"},
}
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_BEAT_SCHEDULE = {
    "metering-credits-expire": {
        "task": "metering.tasks.credits_expire_task",
        "schedule": crontab(minute="*"),
    },
    "metering-holds-expire": {
        "task": "metering.tasks.holds_expire_task",
        "schedule": crontab(minute="*"),
    },
    "accounts-idempotency-purge": {
        "task": "accounts.tasks.idempotency_purge_task",
        "schedule": crontab(minute=17),
    },
}

# --- Metering ---------------------------------------------------------------
# How long a hold may stay pending before the sweeper releases it. By default
# an hour, or six runs of a job: room for its queueing, a dead worker's
# message handed back (the visibility timeout, three runs) and the start
# margin after it (two runs).
METERING_HOLD_TTL = timedelta(
    seconds=env.int("METERING_HOLD_TTL_SECONDS", default=max(3600, math.ceil(6 * _JOB_RUN_S)))
)
# Place and settle holds with the SQL fast path on PostgreSQL (metering/services/
# fastpath.py); off, every call takes the ORM path. The tests run both.
METERING_FAST_PATH = env.bool("METERING_FAST_PATH", default=True)
# Server-side prepared statements for the hot path (accounts/sql.py); false
# behind a transaction-pooling PgBouncer older than 1.21 (the ORM path then).
# Unset, it follows METERING_FAST_PATH: before this setting existed, those
# deployments were told to set METERING_FAST_PATH=false, and must stay safe.
DATABASE_PREPARED_STATEMENTS = env.bool("DATABASE_PREPARED_STATEMENTS", default=METERING_FAST_PATH)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    # The Stripe SDK logs every request at INFO; its errors reach us as exceptions.
    "loggers": {"stripe": {"level": "WARNING"}},
}

# --- Inference ---------------------------------------------------------------
# How long a synchronous API request waits for its job before answering 504;
# a streamed one waits this long for each event (inference.apis).
INFERENCE_TIMEOUT_SECONDS = env.int("INFERENCE_TIMEOUT_SECONDS", default=120)
# How long a job may run, from when its worker takes it, before its request is
# ended, the job failed `job_deadline_exceeded` and billed for what was
# delivered; at most a quarter of a hold's life (job_run_limit;
# inference/checks.py says so when it is capped). It bounds
# asynchronous jobs, streams (which wait INFERENCE_TIMEOUT_SECONDS for each
# event, not for the whole) and jobs whose client is gone; a request that is
# not streamed gives up first (INFERENCE_TIMEOUT_SECONDS).
INFERENCE_JOB_DEADLINE_SECONDS = env.float("INFERENCE_JOB_DEADLINE_SECONDS", default=300.0)
# How long a worker waits for the engine's next response (a stream's first or
# next token) before failing its job `engine_timeout`, billed only what was
# delivered. A request that is not streamed has one response, when its
# generation ends: it waits for it until the job's run limit instead
# (inference.triton, ServerPool.generate).
INFERENCE_ENGINE_TIMEOUT_SECONDS = env.float("INFERENCE_ENGINE_TIMEOUT_SECONDS", default=60.0)
# A streamed job's API process renews a marker in Redis while it reads the
# job's tokens; its worker cancels the job (billing what was generated) when
# the marker lapses, this long after the last renewal: the API process died,
# or its writes to the client stalled that long. It bounds the tokens
# generated for a stream nobody reads. Web processes and workers must agree.
INFERENCE_STREAM_READER_TTL_SECONDS = env.float("INFERENCE_STREAM_READER_TTL_SECONDS", default=15.0)
# Job callbacks (inference.services.callbacks): a signed webhook when an
# asynchronous job ends. Each attempt may take this long in all.
INFERENCE_CALLBACK_TIMEOUT_SECONDS = env.float("INFERENCE_CALLBACK_TIMEOUT_SECONDS", default=10.0)
# The wait after each failed attempt (seconds); one more attempt than delays,
# then the callback is marked failed. Default: 8 attempts over about 20 hours.
INFERENCE_CALLBACK_RETRY_SCHEDULE_SECONDS = [
    int(s)
    for s in env.list(
        "INFERENCE_CALLBACK_RETRY_SCHEDULE_SECONDS",
        default=["10", "60", "300", "1800", "7200", "21600", "43200"],
    )
]
# How often beat queues the callbacks that are due (and any lost on the way).
INFERENCE_CALLBACK_SWEEP_SECONDS = env.int("INFERENCE_CALLBACK_SWEEP_SECONDS", default=10)
# How often beat runs the orphaned jobs' sweep (inference.tasks.jobs_orphaned_sweep),
# which derives from it how far apart two sightings of a missing lease must be and
# how close to its hold's expiry a job is ended (ORPHAN_CONFIRM_S, ORPHAN_HOLD_MARGIN_S).
INFERENCE_ORPHAN_SWEEP_SECONDS = env.int("INFERENCE_ORPHAN_SWEEP_SECONDS", default=60)
# Lets callback URLs name loopback (127.0.0.1, ::1, localhost), over http too:
# for local receivers in development and tests. DEBUG allows it as well.
INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK = env.bool(
    "INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK", default=False
)
CELERY_BEAT_SCHEDULE |= {
    "inference-callbacks-sweep": {
        "task": "inference.tasks.job_callbacks_sweep_task",
        "schedule": timedelta(seconds=INFERENCE_CALLBACK_SWEEP_SECONDS),
    },
    # Slots of jobs that are over or were lost, freed about 5 minutes after
    # they were taken instead of at their lease's end (a hold's life)
    # (concurrency_slots_sweep).
    "inference-concurrency-slots-sweep": {
        "task": "inference.tasks.concurrency_slots_sweep_task",
        "schedule": timedelta(seconds=60),
    },
    # Running jobs whose run is gone (no run lease) and whose message is not
    # coming back, ended failed `worker_lost` instead of expired with their
    # hold an hour later (jobs_orphaned_sweep). The sweep reads its interval from
    # the same setting (a lease missing at two sweeps in a row ends a job).
    "inference-orphaned-jobs-sweep": {
        "task": "inference.tasks.jobs_orphaned_sweep_task",
        "schedule": timedelta(seconds=INFERENCE_ORPHAN_SWEEP_SECONDS),
    },
}
# How long a job's current run (run_started_at: a restart's is its own) must
# have been running, with no run holding its lease at two sweeps in a row
# (jobs_orphaned_sweep), before the sweep ends it as orphaned. Longer than a
# dead worker's message takes to come back and run: at once from a prefork
# child (reject on worker lost), after the broker's visibility timeout from a
# whole worker (a threads pool's); then one more run (at least 5 minutes) for
# it to wait in its queue and take the lease (RUN_LEASE_S, 5 s, is far
# inside that). A live run ends within a run and its settlement's retries;
# one whose lease an outage took (or that started unleased while Redis
# failed) takes it back as soon as Redis answers (inference.relay._RENEW).
# Below a hold's life (by default 35 of its 60 minutes), but that alone does
# not keep a run inside it: a run restarted more than ~23 minutes after its
# job was submitted (a message handed back after the visibility timeout) is
# still in its grace when its hold expires. So the sweep also takes a job
# whose hold expires within a few minutes (tasks.ORPHAN_HOLD_MARGIN_S) as past
# its grace, and ends it billed before the hold's expiry would end it
# `expired`, unbilled. Under the visibility timeout, or at a hold's life or
# more: a `manage.py check` warning (inference.W005, W006). A running job's relay stream outlives it
# (inference.relay.stream_running_ttl_s): what a dead worker streamed is what
# its job is billed for when its message comes back or the sweep ends it.
INFERENCE_ORPHAN_GRACE_SECONDS = env.int(
    "INFERENCE_ORPHAN_GRACE_SECONDS",
    default=CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] + max(300, math.ceil(_JOB_RUN_S)),
)

# --- Redis (rate limits, counters) ---------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/1")
# How long a job's concurrency slot counts against its organization's
# concurrent-jobs limit when nothing releases it (accounts.ratelimits): a
# hold's life and 5 minutes. A job is open at most as long as its hold (it
# starts only with the start margin left, and ends expired with its hold), so
# its slot never lapses while it may still run, however long it queued; the
# sweep frees the slots of jobs that are over, or were never written, after
# 5 minutes (inference's concurrency_slots_sweep).
RATELIMIT_SLOT_LEASE_SECONDS = int(METERING_HOLD_TTL.total_seconds()) + 300

# Limits on people's own attempts through the pages (accounts.views), counted in
# Redis per network address (REMOTE_ADDR: behind a proxy, see README "The customer
# dashboard") or per account: sign-ins a minute per address and per email address
# tried, sign-ups per 10 minutes per address, verification links an hour per
# account, changes through the dashboard's pages (its POSTs) a minute per account.
# Over a limit: a 429 page with Retry-After.
RATELIMIT_SIGNIN_PER_IP = env.int("RATELIMIT_SIGNIN_PER_IP", default=30)
RATELIMIT_SIGNIN_PER_EMAIL = env.int("RATELIMIT_SIGNIN_PER_EMAIL", default=10)
RATELIMIT_SIGNUP_PER_IP = env.int("RATELIMIT_SIGNUP_PER_IP", default=5)
RATELIMIT_VERIFICATION_EMAILS_PER_USER = env.int(
    "RATELIMIT_VERIFICATION_EMAILS_PER_USER", default=3
)
RATELIMIT_DASHBOARD_PER_USER = env.int("RATELIMIT_DASHBOARD_PER_USER", default=60)
# A dashboard form sent again while its first send still runs (a double click) waits
# this long for the first's outcome, to show it, before answering 409
# `idempotency_in_progress` (accounts.dashboard.MemberPage). Longer than a Stripe call
# with its retries takes, short of the web server's worker timeout.
DASHBOARD_FORM_WAIT_SECONDS = env.int("DASHBOARD_FORM_WAIT_SECONDS", default=15)

# --- API ---------------------------------------------------------------------
# Idempotency-Key responses are replayed for this long.
IDEMPOTENCY_TTL = timedelta(hours=24)
# A first request still "running" after this long is taken to have died, and a
# retry may run instead of getting 409 forever.
IDEMPOTENCY_LOCK_TIMEOUT = timedelta(
    seconds=env.int("IDEMPOTENCY_LOCK_TIMEOUT_SECONDS", default=300)
)
# Requests larger than this are refused with 413 before they are read.
API_MAX_BODY_BYTES = env.int("API_MAX_BODY_BYTES", default=1_048_576)
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000")

# --- Billing and Stripe ----------------------------------------------------------
# Billing is on only when STRIPE_SECRET_KEY is set. STRIPE_API_BASE points the
# client at another Stripe API (the local stand-in in tests and `make demo`);
# empty means api.stripe.com.
STRIPE_SECRET_KEY = env.str("STRIPE_SECRET_KEY", default="")
STRIPE_WEBHOOK_SECRET = env.str("STRIPE_WEBHOOK_SECRET", default="")
# The signing secret of the event destination that sends thin events (the billing
# meter's error reports) to the same URL; empty: they must verify with the one above.
STRIPE_THIN_WEBHOOK_SECRET = env.str("STRIPE_THIN_WEBHOOK_SECRET", default="")
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="")
STRIPE_TIMEOUT_SECONDS = env.float("STRIPE_TIMEOUT_SECONDS", default=10.0)
STRIPE_MAX_NETWORK_RETRIES = env.int("STRIPE_MAX_NETWORK_RETRIES", default=2)
# Signatures older than this are refused (Stripe's own default: 5 minutes).
STRIPE_WEBHOOK_TOLERANCE_SECONDS = env.int("STRIPE_WEBHOOK_TOLERANCE_SECONDS", default=300)
# The billing meter overage is reported to, and how often it is reported.
STRIPE_OVERAGE_EVENT_NAME = env.str("STRIPE_OVERAGE_EVENT_NAME", default="gym_overage_credits")
BILLING_OVERAGE_REPORT_MINUTES = env.int("BILLING_OVERAGE_REPORT_MINUTES", default=15)
# How often an overage batch Stripe named as dropped, or refused at once (a 4xx), is sent
# again by itself, the two counted together; failing once more after that (a cause that
# persists: an archived meter, a wrong customer), it is left to finance (admin: Overage
# reports), logged once. Stripe unreachable counts toward nothing. 0: never sent again
# without finance.
BILLING_OVERAGE_MAX_RESENDS = env.int("BILLING_OVERAGE_MAX_RESENDS", default=3)
# A failed renewal keeps inference running this long before it is suspended.
BILLING_GRACE_PERIOD = timedelta(seconds=env.int("BILLING_GRACE_PERIOD_SECONDS", default=3 * 86400))
# Webhook events still pending after this long are queued again by beat.
BILLING_EVENT_RETRY_AFTER = timedelta(
    seconds=env.int("BILLING_EVENT_RETRY_AFTER_SECONDS", default=300)
)

CELERY_BEAT_SCHEDULE |= {
    "billing-events-retry": {
        "task": "gymbilling.tasks.stripe_events_retry_task",
        "schedule": crontab(minute="*"),
    },
    "billing-suspend-overdue": {
        "task": "gymbilling.tasks.subscriptions_suspend_overdue_task",
        "schedule": crontab(minute="*"),
    },
    # The rollover cap of canceled subscriptions' last periods, as they end.
    "billing-last-period-cap": {
        "task": "gymbilling.tasks.subscriptions_last_period_cap_task",
        "schedule": crontab(minute="*"),
    },
    # Lifted downgrades whose restore task gave up while Stripe was down (or was never
    # queued): put back before the period renews without them (checkout._lift_undo_later).
    "billing-downgrades-restore": {
        "task": "gymbilling.tasks.subscriptions_downgrade_restore_task",
        "schedule": timedelta(minutes=10),
    },
    # Retired prices a member's change made active again at Stripe (checkout._price_usable),
    # archived again once no subscription of ours needs them: Stripe's own Checkout and
    # dashboard would otherwise still sell them.
    "billing-retired-prices-archive": {
        "task": "gymbilling.tasks.stripe_prices_retired_archive_task",
        "schedule": crontab(minute=17, hour=3),
    },
    "billing-overage-report": {
        "task": "gymbilling.tasks.overage_report_task",
        "schedule": timedelta(minutes=BILLING_OVERAGE_REPORT_MINUTES),
    },
    # Refunded or disputed credits that running work held: taken back as it
    # settles. Often: until this run, the credits the work gave back sit in
    # the wallet, claimed (no new work may hold them), and the member's other
    # credits are short of that claim (README, refunds). Usually no row is
    # pending, and the query reads a partial index of those.
    "billing-reversals-pending": {
        "task": "gymbilling.tasks.payment_reversals_pending_settle_task",
        "schedule": timedelta(seconds=10),
    },
}

# --- Credit marketplace (gymbilling/market) -------------------------------------------
# Platform fee on each fill, in basis points (1000 = 10%), rounded half up per fill.
MARKET_FEE_BPS = env.int("MARKET_FEE_BPS", default=1000)
# How long an order's reservation is held for payment.
MARKET_RESERVATION_TTL = timedelta(seconds=env.int("MARKET_RESERVATION_SECONDS", default=15 * 60))
# Sellers' proceeds stay pending this long (refunds and disputes can still claw back).
MARKET_PAYOUT_HOLDING = timedelta(days=env.int("MARKET_PAYOUT_HOLDING_DAYS", default=7))
# Abuse limits: listings per seller per 24 hours, price bounds (minor units per
# 1,000 credits), the smallest listing (micro-credits), and the currencies traded.
MARKET_LISTINGS_PER_DAY = env.int("MARKET_LISTINGS_PER_DAY", default=20)
# Orders a buyer organization may have awaiting payment at once: each keeps the credits it
# reserved off the market for MARKET_RESERVATION_SECONDS.
MARKET_PENDING_ORDERS_PER_BUYER = env.int("MARKET_PENDING_ORDERS_PER_BUYER", default=3)
MARKET_PRICE_FLOOR = env.int("MARKET_PRICE_FLOOR", default=1)
MARKET_PRICE_CEILING = env.int("MARKET_PRICE_CEILING", default=100_000)
MARKET_MIN_LISTING_QUANTITY = env.int("MARKET_MIN_LISTING_QUANTITY", default=10_000_000)
MARKET_CURRENCIES = [c.lower() for c in env.list("MARKET_CURRENCIES", default=["usd"])]
# The most listings one order may fill from.
MARKET_ORDER_MAX_LISTINGS = env.int("MARKET_ORDER_MAX_LISTINGS", default=50)
# The least and the most one order may cost (minor units): Stripe refuses a
# card payment under its minimum charge, which differs by currency, and over
# 8 digits. An order outside them is refused before anything is reserved,
# instead of failing at Stripe after its reservation. Stripe's minimums, from
# https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts (a
# settlement in another currency can raise them; MARKET_MIN_ORDER_AMOUNTS,
# "usd=100,jpy=100", overrides per currency). A traded currency with no
# minimum here fails `manage.py check` (gymbilling.E001).
STRIPE_MINIMUM_CHARGES = {
    "usd": 50, "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50,
    "czk": 1500, "dkk": 250, "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500, "inr": 50,
    "jpy": 50, "mxn": 1000, "myr": 200, "nok": 300, "nzd": 50, "pln": 200, "ron": 200,
    "sek": 300, "sgd": 50, "thb": 1000,
}  # fmt: skip


def _amounts_by_currency(name: str) -> dict[str, int]:
    """`usd=100,jpy=100` from the environment, currencies in lower case."""
    amounts = {}
    for pair in filter(None, (p.strip() for p in env.str(name, default="").split(","))):
        currency, _, amount = pair.partition("=")
        try:
            amounts[currency.strip().lower()] = int(amount)
        except ValueError:
            raise environ.ImproperlyConfigured(
                f"{name}: {pair!r} is not currency=minor-units (e.g. usd=50)"
            ) from None
    return amounts


MARKET_MIN_ORDER_AMOUNTS = STRIPE_MINIMUM_CHARGES | _amounts_by_currency("MARKET_MIN_ORDER_AMOUNTS")
MARKET_MAX_ORDER_AMOUNT = env.int("MARKET_MAX_ORDER_AMOUNT", default=99_999_999)

CELERY_BEAT_SCHEDULE |= {
    "market-orders-expire": {
        "task": "gymbilling.market.tasks.market_orders_expire_task",
        "schedule": crontab(minute="*"),
    },
    "market-listings-expire": {
        "task": "gymbilling.market.tasks.market_listings_expire_task",
        "schedule": crontab(minute="*"),
    },
    "market-payouts-run": {
        "task": "gymbilling.market.tasks.market_payouts_run_task",
        "schedule": crontab(minute=23),
    },
    # As billing-reversals-pending, for refunded marketplace purchases; and the plan
    # credits running jobs kept from a rollover's cap, as the jobs give them back.
    "market-reversals-pending": {
        "task": "gymbilling.market.tasks.market_reversals_pending_settle_task",
        "schedule": timedelta(seconds=10),
    },
}

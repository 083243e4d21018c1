import os

from gymbilling.handlers import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gymbilling.settings.production")

application = get_wsgi_application()

"""WSGI entry point for mod_wsgi, gunicorn and IIS/waitress: reads ESMIRROR_INSTALL_DIR."""
from app import make_wsgi

application = make_wsgi()

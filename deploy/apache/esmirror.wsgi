# mod_wsgi entry of the esmirror receiver, rendered by `esmirror deploy apache`.
# The WSGI callable is app.wsgi:application; it reads ESMIRROR_INSTALL_DIR.
import os

os.environ.setdefault("ESMIRROR_INSTALL_DIR", {{install_dir_py}})

from app.wsgi import application  # noqa: E402,F401

"""Production gunicorn settings for fileproxy, for running gunicorn itself: `gunicorn -c gunicorn.conf.py`."""

# The settings and hooks live in the package, fileproxy/server/gunicorn_settings.py, each explained
# in one line there: `fileproxy serve` (installed with pip, or `./run.sh`) loads that module
# itself and needs no file here. This file is for running gunicorn directly:
#
#     FILEPROXY_CONFIG=/etc/fileproxy/fileproxy.toml gunicorn -c gunicorn.conf.py
#
# The values users tune (bind, workers, keep-alive, graceful timeout, log level, socket options)
# come from fileproxy's Config: FILEPROXY_* env vars and the FILEPROXY_CONFIG TOML file
# (examples/fileproxy.toml lists every setting). A gunicorn setting assigned below the import
# overrides the package's value for this deployment.

from fileproxy.server.gunicorn_settings import *  # noqa: F403

"""TLS on both sides: `files` (reading and checking PEM files), `server` (the listener's
certificate, rotation, client certificates), `upstream` (trust, client certificates, failures).

The names are re-exported here for `from proxy import tls` callers.
"""

from proxy.tls.files import *  # noqa: F403
from proxy.tls.server import *  # noqa: F403
from proxy.tls.upstream import *  # noqa: F403

"""moto's server with one request at a time.

DynamoDB applies a conditional write atomically. moto's in-memory backend
does not: `PutItem` reads the current item, evaluates the condition and then
stores, in Python, while other server threads run. Two concurrent
`attribute_not_exists` writes can then both succeed, which real DynamoDB
never allows and which the DynamoDB store's tests (one execution out of many
concurrent same-key requests) would report as a double execution. Serving
one request at a time restores the atomicity the store relies on.

    python moto-serial.py HOST PORT
"""

import os
import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


class Serial:
    """A WSGI application that runs `app` under one lock, body included."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        return [body]


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    # As moto_server does: moto builds some URLs from it.
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, Serial(app), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()

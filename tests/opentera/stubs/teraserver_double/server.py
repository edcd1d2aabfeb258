"""The tests' Flask app (with the double's endpoints) on a real port, for assetd to call.

The tests reach the app in-process (Flask's test client); assetd reaches the same app, and so the
same database, over HTTP at 127.0.0.1:$TERASERVER_PORT. Every test class builds a new app and
database, so the server, started once, always serves the app built last.

Both paths share one in-memory SQLite connection (see modules.DatabaseModule.DBManager), which
is not meant for two statements at once: requests to the double's endpoints are run one at a
time, whichever path they come by. Requests to `/api/file/...` are not: the test's request
there waits on assetd, which calls the double meanwhile.
"""
import threading

from werkzeug.serving import make_server

from ot_harness import settings

_double_lock = threading.RLock()
_current_app = None
_server = None
_server_lock = threading.Lock()


class _OneAtATime:
    """WSGI middleware: the double's requests, one at a time; the FTS proxy's, freely."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        if environ.get('PATH_INFO', '').startswith('/api/file'):
            return self.wsgi_app(environ, start_response)
        with _double_lock:
            # The whole body is produced under the lock: the double's answers are small JSON.
            result = self.wsgi_app(environ, start_response)
            try:
                return list(result)
            finally:
                if hasattr(result, 'close'):
                    result.close()


def _dispatch(environ, start_response):
    app = _current_app
    if app is None:
        start_response('503 Service Unavailable', [('Content-Type', 'text/plain')])
        return [b'no test class has set up the TeraServer double yet\n']
    return app(environ, start_response)


def serve(flask_app) -> None:
    """Make `flask_app` the one served (from now on) and start the server on first use."""
    global _current_app, _server
    if not isinstance(flask_app.wsgi_app, _OneAtATime):
        flask_app.wsgi_app = _OneAtATime(flask_app.wsgi_app)
    _current_app = flask_app
    with _server_lock:
        if _server is None:
            _server = make_server('127.0.0.1', settings.teraserver_port(), _dispatch, threaded=True)
            threading.Thread(target=_server.serve_forever, name='teraserver-double', daemon=True).start()

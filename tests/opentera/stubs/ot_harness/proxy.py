"""The FileTransferService namespace of the tests' Flask app, forwarding every request to assetd.

FakeFileTransferService mounts FTS's API on its own Flask app at `/api/file/...` and the tests
call it with Flask's test client. Here that namespace holds a single catch-all resource that
sends the request over real HTTP to the run's nginx (`/file/api/<path>`; nginx strips `/file`,
so assetd gets `/api/<path>`), or to assetd itself when direct, and hands back the answer
unchanged: status, headers and raw body.
"""
import json
import urllib.parse

from flask import Response, request
from flask_restx import Namespace, Resource

from ot_harness import assetd, fts_records

# Characters left as they are when the path goes back into a URL (RFC 3986 pchar and '/').
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


class AssetdProxy(Resource):
    """Every method of `/api/file/<path>` goes to assetd. One method per HTTP verb, because
    flask-restx only routes the methods a resource defines."""

    def __init__(self, api=None, *args, **kwargs):
        Resource.__init__(self, api, *args, **kwargs)

    def get(self, path=''):
        return forward(path)

    def head(self, path=''):
        return forward(path)

    def post(self, path=''):
        return forward(path)

    def put(self, path=''):
        return forward(path)

    def patch(self, path=''):
        return forward(path)

    def delete(self, path=''):
        return forward(path)

    def options(self, path=''):
        return forward(path)


def register(namespace: Namespace):
    namespace.add_resource(AssetdProxy, '/', '/<path:path>')


def forward(path: str) -> Response:
    # The raw body, not request.form/files: assetd must see the multipart bytes the test built.
    body = request.get_data(cache=False)
    query = request.query_string.decode('latin-1')
    upstream = assetd.send(request.method, urllib.parse.quote(path, safe=_PATH_SAFE), query,
                           headers=request.headers.items(), body=body or None,
                           client_host=request.host.split(':')[0], client_addr=request.remote_addr or '127.0.0.1')
    try:
        # decode_content=False: the bytes as assetd sent them, so Content-Encoding and
        # Content-Length stay true.
        content = upstream.raw.read(decode_content=False)
    finally:
        upstream.close()

    fts_records.observe(request.method, path, request.args, upstream.status_code, _json_or_none(upstream, content))

    # An answer without Content-Length (chunked) stays without one: Werkzeug counts a body
    # given as bytes, not one given as an iterable. urllib3 yields a repeated header
    # (Set-Cookie) once per value.
    body = content if 'Content-Length' in upstream.headers else iter([content])
    response = Response(body, status=upstream.status_code, headers=assetd.forwardable(upstream.raw.headers.items()))
    if 'Content-Type' not in upstream.headers:
        del response.headers['Content-Type']  # Werkzeug's default, which assetd did not send
    if 'Content-Length' in upstream.headers:
        # Werkzeug counts the body it was given; for HEAD that is 0, assetd's count is the truth.
        response.headers['Content-Length'] = upstream.headers['Content-Length']
    return response


def _json_or_none(upstream, content: bytes):
    if 'json' not in upstream.headers.get('Content-Type', '') or upstream.headers.get('Content-Encoding'):
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None

"""Requests to assetd through the run's nginx (tests/opentera/nginx.conf: OpenTera's location /file/
of config/opentera.conf), or, with OPENTERA_TESTS_DIRECT=1, straight to assetd with the headers that
nginx would add."""
import requests
from requests.structures import CaseInsensitiveDict

from ot_harness import settings

# Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are never forwarded; Host
# and Content-Length are set by `requests` for the new connection and body.
_NOT_FORWARDED = {'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'proxy-connection',
                  'te', 'trailer', 'transfer-encoding', 'upgrade', 'host', 'content-length'}

# A 100 MiB upload or download over loopback takes seconds; two minutes mean assetd is stuck.
TIMEOUT = (10, 120)


def nginx_headers(client_host: str, client_addr: str) -> dict:
    """The headers nginx adds on its way to the service. `X_ExternalServer` really has an
    underscore: FTS reads `request.headers['X_EXTERNALSERVER']` to build its answer URLs."""
    return {
        'X-ExternalPort': str(settings.EXTERNAL_PORT),      # $server_port
        'X-ExternalHost': client_host,                       # $host: the client's Host, without port
        'X_ExternalServer': settings.EXTERNAL_SERVER,        # $server_name
        'X-Real-IP': client_addr,                            # $remote_addr
        'X-Forwarded-For': client_addr,                      # $proxy_add_x_forwarded_for (no earlier hop)
        'X-Forwarded-Proto': 'https',                        # $scheme: nginx listens with TLS
        'X-Scheme': 'https',
        'X-Script-Name': '/file',
    }


def forwardable(headers) -> list:
    """The (name, value) pairs of `headers` a proxy passes on, repeated names kept."""
    return [(name, value) for name, value in headers if name.lower() not in _NOT_FORWARDED]


def send(method: str, path: str, query: str = '', headers=None, body: bytes | None = None,
         client_host: str = '127.0.0.1', client_addr: str = '127.0.0.1') -> requests.Response:
    """`method <base>/api/<path>?<query>`; the answer's body is left unread (stream=True) so the
    caller can take the raw bytes, still encoded as assetd sent them."""
    url = f'{settings.fts_base_url()}/api/{path}'
    if query:
        url += '?' + query
    outgoing = CaseInsensitiveDict()
    for name, value in forwardable(headers or []):
        # One field per name for `requests`: repeated ones joined as HTTP allows (RFC 9110
        # §5.3; cookies with '; ', RFC 6265 §5.4).
        separator = '; ' if name.lower() == 'cookie' else ', '
        outgoing[name] = outgoing[name] + separator + value if name in outgoing else value
    for default in ('Accept', 'Accept-Encoding', 'User-Agent'):
        # `requests` would add its own (gzip among them, which the tests' client could not
        # read): only what the client sent goes to assetd. None removes a default.
        outgoing.setdefault(default, None)
    if not settings.via_nginx():
        # Through nginx these come from nginx itself; sent directly, the proxy stands in for it.
        outgoing.update(nginx_headers(client_host, client_addr))
    return requests.request(method, url, headers=outgoing, data=body, stream=True, allow_redirects=False,
                            timeout=TIMEOUT)

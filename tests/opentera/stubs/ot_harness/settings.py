"""Where the processes of a run are, taken from the environment scripts/opentera-tests sets.

Everything that talks to Redis, assetd or the TeraServer double gets its address here, so a
run never falls back on OpenTera's defaults (Redis on 6379, TeraServer on 40075).
"""
import functools
import os

import redis

# What OpenTera's nginx announces to the services behind it (config/nginx.conf: `listen 40075`,
# `server_name 127.0.0.1`): X_ExternalServer is its server_name, X-ExternalPort the port it
# listens on. The fake TeraServer module of the tests uses the same pair (FakeFlaskModule sets
# server_config to 127.0.0.1:40075). Run directly, the proxy announces that pair itself; through
# the run's nginx (tests/opentera/nginx.conf, same server_name), the port is nginx's own.
EXTERNAL_SERVER = '127.0.0.1'
EXTERNAL_PORT = 40075


def _port(name: str) -> int:
    value = os.environ.get(name, '')
    if not value.isdigit():
        raise RuntimeError(f'{name} is not set (or not a port number): run these tests with scripts/opentera-tests')
    return int(value)


def assetd_port() -> int:
    return _port('ASSETD_PORT')


def teraserver_port() -> int:
    return _port('TERASERVER_PORT')


def redis_port() -> int:
    return _port('REDIS_PORT')


def via_nginx() -> bool:
    """OPENTERA_TESTS_VIA_NGINX=1 (scripts/opentera-tests sets it unless OPENTERA_TESTS_DIRECT=1):
    send the FTS requests to nginx's /file/ location (NGINX_PORT) instead of assetd itself, so
    nginx strips the prefix and adds its headers as in a deployment."""
    return os.environ.get('OPENTERA_TESTS_VIA_NGINX', '') == '1'


def nginx_port() -> int:
    return _port('NGINX_PORT')


def external_port() -> int:
    """The port nginx announces in X-ExternalPort ($server_port): the run's nginx when there is
    one, else OpenTera's 40075, which the proxy announces in its place."""
    return nginx_port() if via_nginx() else EXTERNAL_PORT


def fts_base_url() -> str:
    """Where `/api/file/<path>` of the tests goes: `<base>/api/<path>`. assetd in OpenTera mode
    serves at the root, as FTS does behind nginx (which strips `/file`)."""
    if via_nginx():
        return f'http://127.0.0.1:{nginx_port()}/file'
    return f'http://127.0.0.1:{assetd_port()}'


def redis_config() -> dict:
    """The private Redis of the run, in the shape OpenTera's config managers use."""
    return {'hostname': '127.0.0.1', 'port': redis_port(), 'db': 0, 'username': '', 'password': ''}


@functools.cache
def redis_client() -> redis.Redis:
    """One client (its pool is thread-safe) for the double, the proxy and the stubs."""
    config = redis_config()
    return redis.Redis(host=config['hostname'], port=config['port'], db=config['db'],
                       client_name='opentera-tests-harness')

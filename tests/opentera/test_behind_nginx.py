"""assetd's documentation and CORS through OpenTera's nginx, which strips `/file`.

Our checks, not OpenTera's: scripts/opentera-tests collects them after the FTS tests and the
archive worker's, with the same environment (see tests/opentera/README.md). Every request goes to
the run's nginx (tests/opentera/nginx.conf: OpenTera's `location /file/`), as a browser would:

- `GET /file/doc` is a redirect whose Location, resolved against the request's URL, is
  `/file/doc/` on the same server (a Location naming `/doc/` would leave nginx's prefix);
- `GET /file/doc/` is the Swagger UI page, and every file it links resolves under `/file/doc/`
  and is there, as is the OpenAPI document the page's initializer names;
- `GET /file/doc/openapi.json` is JSON whose `servers[0].url` is `/file` (what nginx declares in
  X-Script-Name), so the operations' paths (`/api/assets`…) are called as `/file/api/assets`;
- answers, the API's refusals and OPTIONS included, carry `Access-Control-Allow-Origin: *`.

With OPENTERA_TESTS_DIRECT=1 the same requests go to assetd itself with the headers the proxy
adds in nginx's place (X-Script-Name `/file` among them): the paths are then assetd's, without
`/file`, and the document still names `/file` as its server.
"""
import html.parser
import re
import unittest
import urllib.parse

import requests

from ot_harness import assetd, settings

TIMEOUT = (10, 30)
# What nginx declares in X-Script-Name (OpenTera's opentera.conf, location /file/).
SCRIPT_NAME = '/file'


class _Links(html.parser.HTMLParser):
    """The `src` of scripts and images and the `href` of stylesheets and icons of a page."""

    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag in ('script', 'img') and attributes.get('src'):
            self.links.append(attributes['src'])
        elif tag == 'link' and attributes.get('href'):
            self.links.append(attributes['href'])


class BehindOpenTeraNginxTest(unittest.TestCase):

    def setUp(self):
        # http://127.0.0.1:<nginx>/file, or assetd's root when direct.
        self.base = settings.fts_base_url()
        self.prefix = urllib.parse.urlsplit(self.base).path  # '/file', or '' when direct

    def _get(self, url: str, method: str = 'GET', headers: dict | None = None) -> requests.Response:
        sent = dict(headers or {})
        if not settings.via_nginx():
            sent.update(assetd.nginx_headers('127.0.0.1', '127.0.0.1'))
        response = requests.request(method, url, headers=sent, allow_redirects=False, timeout=TIMEOUT)
        if settings.via_nginx():
            # nginx replaces the upstream's Server header with its own: the answer came through it.
            self.assertTrue(response.headers.get('Server', '').startswith('nginx'),
                            f'{method} {url} did not come through nginx: {dict(response.headers)}')
        return response

    def _assert_cors(self, response: requests.Response, what: str):
        self.assertEqual('*', response.headers.get('Access-Control-Allow-Origin'),
                         f'{what}: Access-Control-Allow-Origin; headers {dict(response.headers)}')

    def test_doc_redirects_to_the_page_under_the_prefix(self):
        url = f'{self.base}/doc'
        response = self._get(url)
        self.assertEqual(302, response.status_code, response.text[:500])
        location = response.headers.get('Location')
        self.assertTrue(location, 'no Location')
        resolved = urllib.parse.urljoin(url, location)
        self.assertEqual(f'{self.base}/doc/', resolved, f'Location {location!r} resolves to {resolved}')
        self._assert_cors(response, 'GET /doc')
        # And it leads to the page.
        page = self._get(resolved)
        self.assertEqual(200, page.status_code, page.text[:500])
        self.assertIn('text/html', page.headers.get('Content-Type', ''))

    def test_doc_page_is_swagger_ui_and_its_files_resolve_under_the_prefix(self):
        url = f'{self.base}/doc/'
        response = self._get(url)
        self.assertEqual(200, response.status_code, response.text[:500])
        self.assertIn('text/html', response.headers.get('Content-Type', ''))
        self.assertIn('swagger-ui', response.text)
        self._assert_cors(response, 'GET /doc/')

        parser = _Links()
        parser.feed(response.text)
        links = [link for link in parser.links if not link.startswith('data:')]
        self.assertTrue(links, 'the page links no file')
        for link in links:
            resolved = urllib.parse.urljoin(url, link)
            self.assertTrue(resolved.startswith(f'{self.base}/doc/'), f'{link!r} resolves to {resolved}, '
                            f'outside {self.base}/doc/')
            linked = self._get(resolved)
            self.assertEqual(200, linked.status_code, f'{resolved}: {linked.text[:300]}')

        # The initializer names the document by a URL that also stays under the prefix.
        initializer = next((urllib.parse.urljoin(url, link) for link in links if 'initializer' in link), None)
        self.assertIsNotNone(initializer, f'no swagger-initializer among {links}')
        script = self._get(initializer).text
        named = re.findall(r'"?url"?\s*:\s*"([^"]+)"', script)
        self.assertTrue(named, f'no document URL in {initializer}: {script[:1000]}')
        for document in named:
            resolved = urllib.parse.urljoin(initializer, document)
            self.assertEqual(f'{self.base}/doc/openapi.json', resolved, f'{document!r} in {initializer}')

    def test_openapi_document_names_the_prefix_as_its_server(self):
        response = self._get(f'{self.base}/doc/openapi.json')
        self.assertEqual(200, response.status_code, response.text[:500])
        self.assertIn('application/json', response.headers.get('Content-Type', ''))
        document = response.json()
        self.assertEqual(SCRIPT_NAME, document['servers'][0]['url'], document.get('servers'))
        # Its operations, called under that server, are where nginx sends them to assetd.
        self.assertIn('/api/assets', document['paths'])
        self._assert_cors(response, 'GET /doc/openapi.json')

    def test_api_answers_carry_cors_for_any_origin(self):
        origin = {'Origin': 'https://example.org'}
        # A refusal (no token: 403 in OpenTera mode, as FTS).
        refused = self._get(f'{self.base}/api/assets?asset_uuid=00000000-0000-0000-0000-000000000000',
                            headers=origin)
        self.assertEqual(403, refused.status_code, refused.text[:500])
        self._assert_cors(refused, 'GET /api/assets without a token')
        # A browser's preflight.
        preflight = self._get(f'{self.base}/api/assets', method='OPTIONS',
                              headers=dict(origin, **{'Access-Control-Request-Method': 'POST',
                                                      'Access-Control-Request-Headers': 'authorization'}))
        self.assertEqual(200, preflight.status_code, preflight.text[:500])
        self._assert_cors(preflight, 'OPTIONS /api/assets')
        # A success.
        health = self._get(f'{self.base}/health', headers=origin)
        self.assertEqual(200, health.status_code, health.text[:500])
        self._assert_cors(health, 'GET /health')

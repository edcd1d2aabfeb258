"""FTS's FlaskModule, for what FakeFileTransferService and the tests take from it: its Flask
app, its Api class, its `authorizations` and `FlaskModule.init_api`, which mounts FTS's API on
a namespace. Here the namespace forwards every request to assetd (ot_harness.proxy)."""
from flask import Flask, request, url_for
from flask_restx import Api, Namespace

from ot_harness import proxy

# FTS's own app. In these tests FTS's API lives on FakeFileTransferService's app instead; the
# base test class only sets UPLOAD_FOLDER on this one.
flask_app = Flask('FileTransferService')

# What FTS documents for its API (Swagger security schemes).
authorizations = {
    'HTTPAuth': {'type': 'basic', 'in': 'header'},
    'Token Authentication': {'type': 'apiKey', 'in': 'header', 'name': 'OpenTera'},
}


class CustomAPI(Api):
    """FTS's Api: behind nginx, which strips `/file` on the way in, the documentation's own links
    need that prefix back (nginx sends it as X-Script-Name)."""

    @property
    def specs_url(self):
        return request.headers.get('X-Script-Name', '') + url_for(self.endpoint('specs'), _external=False)

    @property
    def base_path(self):
        return request.headers.get('X-Script-Name', '') + url_for(self.endpoint('root'), _external=False)


class FlaskModule:
    @staticmethod
    def init_api(module, namespace: Namespace, additional_args: dict | None = None):
        proxy.register(namespace)

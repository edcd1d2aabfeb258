"""TeraServer's FlaskModule, for its `init_*_api` functions: FakeFileTransferService calls them
to mount TeraServer's API on namespaces of its own Flask app. Here they mount the double's
endpoints, and make that app the one assetd reaches over HTTP."""
from flask_restx import Namespace

from teraserver_double import api, server


def _serve(module) -> None:
    # FakeFlaskModule passes itself; it holds the Flask app its namespaces belong to.
    server.serve(module.flask_app)


class FlaskModule:
    @staticmethod
    def init_service_api(module, namespace: Namespace, additional_args: dict | None = None):
        api.register_service_api(module, namespace, additional_args)
        _serve(module)

    @staticmethod
    def init_user_api(module, namespace: Namespace, additional_args: dict | None = None):
        api.register_user_api(module, namespace, additional_args)
        _serve(module)

    @staticmethod
    def init_participant_api(module, namespace: Namespace, additional_args: dict | None = None):
        api.register_participant_api(module, namespace, additional_args)
        _serve(module)

    @staticmethod
    def init_device_api(module, namespace: Namespace, additional_args: dict | None = None):
        api.register_device_api(module, namespace, additional_args)
        _serve(module)

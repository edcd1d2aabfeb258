"""TeraServer's LoginModule, as FakeFileTransferService and the base test class build it.

In TeraServer it sets up Flask-Login and the authentication callbacks of the API; the double's
endpoints authenticate with teraserver_double.auth instead, so this only keeps what the
constructor is given. Its Redis is the run's private one whatever the config says: the base
test class passes OpenTera's server ConfigManager, whose create_defaults hard-codes
127.0.0.1:6379."""
from ot_harness import settings
import modules.Globals as Globals


class LoginModule:
    # TeraServer keeps a class-level client for its static helpers.
    redis_client = None

    def __init__(self, config, app=None):
        self.config = config
        self.app = app
        LoginModule.redis_client = settings.redis_client()
        Globals.login_module = self

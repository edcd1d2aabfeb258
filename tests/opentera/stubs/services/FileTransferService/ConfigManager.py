"""FTS's ConfigManager, as the tests build it (create_defaults): the same sections, with the
addresses of this run. FTS is assetd, so its own port is assetd's; its backend (TeraServer) is
the double's port; Redis is the run's private server."""
from opentera.services.ServiceConfigManager import ServiceConfigManager

from ot_harness import settings


class ConfigManager(ServiceConfigManager):
    def __init__(self):
        super().__init__()
        # Instance attributes: OpenTera's config classes keep these dicts at class level, shared
        # by every instance of every config manager.
        self.service_config = {}
        self.redis_config = {}
        self.backend_config = {}
        self.db_config = {}
        self.filetransfer_config = {}

    def create_defaults(self):
        self.service_config = {'name': 'FileTransferService', 'hostname': '127.0.0.1', 'port': settings.assetd_port(),
                               'debug_mode': False, 'ServiceUUID': 'invalid'}
        self.backend_config = {'hostname': '127.0.0.1', 'port': settings.teraserver_port()}
        self.redis_config = settings.redis_config()
        # FTS's own database is assetd's; nothing in the tests opens one here.
        self.db_config = {}
        self.filetransfer_config = {'files_directory': '.'}

"""FTS's DBManager. FTS's table of files is assetd's business now (see AssetFileData); the base
test class replaces `db` with the TeraServer double's database right after building this, and
FTS's create_defaults creates nothing, so neither does this one."""
from services.FileTransferService.FlaskModule import flask_app


class DBManager:
    def __init__(self, app=flask_app, test: bool = False):
        self.db = None
        self.db_uri = None
        self.app = app
        self.test = test

    def create_defaults(self, config, test: bool = False):
        pass

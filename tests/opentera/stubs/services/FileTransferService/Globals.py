"""FTS's Globals. The tests set `service` (the FakeFileTransferService)."""
from services.FileTransferService.ConfigManager import ConfigManager
from services.FileTransferService.libfiletransferservice.db.DBManager import DBManager

config_man = ConfigManager()
db_man = DBManager()
redis_client = None
service = None

"""TeraServer's DatabaseModule/DBManager, as FakeFileTransferService uses it: an in-memory
database of OpenTera's models (from the PyPI package) filled with OpenTera's test data.

Beyond what the Fake asks of it, it does what TeraServer does at start around that database:
announce the models' changes on Redis and publish the services' records (teraserver_double.events).
"""
from sqlite3 import Connection as SQLite3Connection

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from opentera.db.Base import BaseModel
from opentera.db.models.TeraAsset import TeraAsset
from opentera.db.models.TeraDevice import TeraDevice
from opentera.db.models.TeraDeviceParticipant import TeraDeviceParticipant
from opentera.db.models.TeraDeviceProject import TeraDeviceProject
from opentera.db.models.TeraDeviceSite import TeraDeviceSite
from opentera.db.models.TeraDeviceSubType import TeraDeviceSubType
from opentera.db.models.TeraDeviceType import TeraDeviceType
from opentera.db.models.TeraParticipant import TeraParticipant
from opentera.db.models.TeraParticipantGroup import TeraParticipantGroup
from opentera.db.models.TeraProject import TeraProject
from opentera.db.models.TeraServerSettings import TeraServerSettings
from opentera.db.models.TeraService import TeraService
from opentera.db.models.TeraServiceAccess import TeraServiceAccess
from opentera.db.models.TeraServiceConfig import TeraServiceConfig
from opentera.db.models.TeraServiceProject import TeraServiceProject
from opentera.db.models.TeraServiceRole import TeraServiceRole
from opentera.db.models.TeraServiceSite import TeraServiceSite
from opentera.db.models.TeraSession import TeraSession
from opentera.db.models.TeraSessionEvent import TeraSessionEvent
from opentera.db.models.TeraSessionType import TeraSessionType
from opentera.db.models.TeraSessionTypeProject import TeraSessionTypeProject
from opentera.db.models.TeraSessionTypeServices import TeraSessionTypeServices
from opentera.db.models.TeraSessionTypeSite import TeraSessionTypeSite
from opentera.db.models.TeraSite import TeraSite
from opentera.db.models.TeraTest import TeraTest
from opentera.db.models.TeraTestType import TeraTestType
from opentera.db.models.TeraTestTypeProject import TeraTestTypeProject
from opentera.db.models.TeraTestTypeSite import TeraTestTypeSite
from opentera.db.models.TeraUser import TeraUser
from opentera.db.models.TeraUserGroup import TeraUserGroup
from opentera.db.models.TeraUserPreference import TeraUserPreference
from opentera.db.models.TeraUserUserGroup import TeraUserUserGroup

import modules.Globals as Globals
from teraserver_double import events

# The defaults, in the order TeraServer creates them (DBManager.create_defaults): each group
# needs the ones before it. A group is created when its first model's table is empty.
_DEFAULTS = (
    (TeraServerSettings,),
    (TeraService,),
    (TeraServiceRole,),
    (TeraSite,),
    (TeraProject,),
    (TeraDeviceType,),
    (TeraServiceProject,),
    (TeraServiceSite,),
    (TeraParticipantGroup,),
    (TeraUserGroup,),
    (TeraParticipant,),
    (TeraUser, TeraUserUserGroup, TeraUserPreference),
    (TeraDevice, TeraDeviceProject, TeraDeviceParticipant, TeraServiceAccess, TeraDeviceSubType),
    (TeraDeviceSite,),
    (TeraSessionType, TeraSessionTypeProject),
    (TeraSessionTypeSite,),
    (TeraSessionTypeServices,),
    (TeraSession, TeraSessionEvent),
    (TeraAsset,),
    (TeraServiceConfig,),
    (TeraTestType, TeraTestTypeSite, TeraTestTypeProject),
    (TeraTest,),
)


@event.listens_for(Engine, 'connect')
def _sqlite_foreign_keys(dbapi_connection, connection_record):
    # As TeraServer: SQLite enforces foreign keys only when asked, per connection.
    if isinstance(dbapi_connection, SQLite3Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute('PRAGMA foreign_keys=ON;')
        cursor.close()


class DBManager:
    def __init__(self, config, app=None):
        self.config = config
        self.app = app
        self.db = SQLAlchemy(engine_options={'future': True}, session_options={'future': True})
        self.db_uri = None
        self.db_in_ram = False
        Globals.db_man = self

    def open_local(self, db_infos, echo=False, ram=True):
        if ram:
            self.db_uri = 'sqlite://'
            self.db_in_ram = True
            # One connection for every thread (StaticPool, check_same_thread off): the tests and
            # the double's HTTP server (teraserver_double.server) use the database from different
            # threads, and an in-memory SQLite database belongs to its connection; a connection
            # per thread would give each an empty database.
            engine_options = {'poolclass': StaticPool, 'connect_args': {'check_same_thread': False}}
        else:
            self.db_uri = 'sqlite:///%(filename)s' % db_infos
            engine_options = {}
        self.app.config.update({
            'SQLALCHEMY_DATABASE_URI': self.db_uri,
            'SQLALCHEMY_TRACK_MODIFICATIONS': False,
            'SQLALCHEMY_ECHO': echo,
            'SQLALCHEMY_ENGINE_OPTIONS': engine_options,
        })
        self.db.init_app(self.app)
        BaseModel.set_db(self.db)
        with self.app.app_context():
            # TeraServer also stamps the schema for Alembic; a new database needs no migration.
            BaseModel.create_all()
        events.listen_to_database()

    def create_defaults(self, config, test=False):
        with self.app.app_context():
            for group in _DEFAULTS:
                if group[0].get_count() == 0:
                    for model in group:
                        model.create_defaults(test)
                if group[0] is TeraService:
                    Globals.opentera_service_id = TeraService.get_openteraserver_service().id_service
            events.publish_service_records()

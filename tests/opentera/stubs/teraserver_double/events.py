"""What TeraServer publishes on Redis that concerns FTS: database events and service records."""
import datetime
import json

import opentera.messages.python as messages
from opentera.db.models import EventNameClassMap
from opentera.db.models.TeraService import TeraService
from opentera.modules.BaseModule import ModuleNames, create_module_event_topic_from_name
from opentera.redis.RedisVars import RedisVars
from sqlalchemy import event

from ot_harness import settings

_listening = False


def publish_database_event(event_type, event_name: str, value: dict) -> None:
    """One `TeraEvent` holding one `DatabaseEvent` on `module.TeraServer.DatabaseModule.events.<name>`,
    built as TeraServer's DBManager builds it (BaseModule.create_event_message)."""
    topic = create_module_event_topic_from_name(ModuleNames.DATABASE_MODULE_NAME, event_name)
    database_event = messages.DatabaseEvent()
    database_event.type = event_type
    database_event.object_type = event_name
    database_event.object_value = json.dumps(value)

    tera_event = messages.TeraEvent()
    tera_event.header.version = 1
    tera_event.header.time = datetime.datetime.now().timestamp()
    tera_event.header.topic = topic
    packed = messages.Any()
    packed.Pack(database_event)
    tera_event.events.append(packed)
    settings.redis_client().publish(topic, tera_event.SerializeToString())


def listen_to_database() -> None:
    """TeraServer's DBManager.setup_events: every insert, update and delete of the models in
    EventNameClassMap is announced. FTS listens to the `asset` ones (a deleted asset's file goes
    when its DB_DELETE arrives; soft deletes, which TeraServer's DELETE does, are updates).

    The listeners are on the model classes, which outlive each test class's database, so they
    are installed once per process."""
    global _listening
    if _listening:
        return
    _listening = True
    for event_name, model in EventNameClassMap.items():
        _listen(model, event_name)


def _listen(model, event_name: str) -> None:
    # object_type is the model's name, which is also its key in EventNameClassMap.
    @event.listens_for(model, 'after_insert')
    def inserted(mapper, connection, target):
        value = target.to_json_create_event()
        if value:
            publish_database_event(messages.DatabaseEvent.DB_CREATE, event_name, value)

    @event.listens_for(model, 'after_update')
    def updated(mapper, connection, target):
        value = target.to_json_update_event()
        if value:
            publish_database_event(messages.DatabaseEvent.DB_UPDATE, event_name, value)

    @event.listens_for(model, 'after_delete')
    def deleted(mapper, connection, target):
        value = target.to_json_delete_event()
        if value:
            publish_database_event(messages.DatabaseEvent.DB_DELETE, event_name, value)


def publish_service_records() -> None:
    """TeraServer's ServiceLauncherModule.update_redis_all_service_info, at start: `service.<key>`
    holds the JSON of every enabled service but TeraServer itself. FTS (and assetd in its place)
    takes its uuid, port and endpoints from `service.FileTransferService`. Every test class
    builds a new database with new uuids, so this runs after each build."""
    client = settings.redis_client()
    for service in TeraService.query.all():
        if service.service_key == 'OpenTeraServer' or not service.service_enabled:
            continue
        client.set(RedisVars.RedisVar_ServicePrefixKey + service.service_key, json.dumps(service.to_json()))

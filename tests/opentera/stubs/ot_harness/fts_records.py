"""FTS's own table of files (t_asset_file_data), with assetd in FTS's place.

Two tests read that table directly rather than through the API (see AssetFileData, which uses
this module):

- `delete_asset` of test_QueryAssetFileAndInfos, the clean-up after each `DELETE
  /api/file/assets`, expects the row to still be there after the DELETE and removes it with
  `delete_file_asset`. That holds in FTS: its DELETE only asks TeraServer to delete the asset,
  and FTS drops the row and the file when TeraServer's database event for the asset reaches it
  (FakeFileTransferService even ignores those events).
- `test_multiple_queries_as_post` counts the rows for a list of uuids and compares the count
  with the answer of `POST /api/file/assets/infos`.

A row is what assetd reports: `GET /api/assets/infos` asked as FTS itself (its service token
and an access token for its own uuid). One exception, the FTS behaviour above: if assetd
forgets an asset as soon as its DELETE succeeds, the row the upload created is still given
for that asset, taken from assetd's own upload answer, which the proxy records. Nothing else
comes from that record: an asset assetd does not know and that was not deleted through the
API has no row.
"""
import json
import threading
import time
import warnings
from urllib.parse import urlencode

import jwt
import opentera.messages.python as messages
from opentera.db.models.TeraAsset import TeraAsset
from opentera.redis.RedisVars import RedisVars

from ot_harness import assetd, settings

# The columns of FTS's AssetFileData.
ROW_FIELDS = ('id_asset_file_data', 'asset_uuid', 'asset_original_filename', 'asset_file_size')

# How long delete_file_asset waits for assetd to act on the delete event.
DROP_WAIT_SECONDS = 5

_lock = threading.Lock()
_uploaded: dict[str, dict] = {}  # asset_uuid -> assetd's answer to the upload (kept in step with renames)
_deleted_through_api: set[str] = set()  # DELETE /api/file/assets?uuid= answered 200
_dropped: set[str] = set()  # rows removed by the tests (delete_file_asset)


def observe(method: str, path: str, args, status: int, body) -> None:
    """Called by the proxy with each exchange: notes uploads, renames and deletes assetd accepted."""
    if status != 200:
        return
    path = path.strip('/')
    with _lock:
        if method == 'POST' and path == 'assets' and isinstance(body, dict) and body.get('asset_uuid'):
            _uploaded[body['asset_uuid']] = dict(body)
        elif method == 'POST' and path == 'assets/infos' and isinstance(body, dict) \
                and body.get('asset_uuid') in _uploaded:
            _uploaded[body['asset_uuid']].update({k: body[k] for k in ROW_FIELDS if k in body})
        elif method == 'DELETE' and path == 'assets' and args.get('uuid'):
            _deleted_through_api.add(args['uuid'])


def row(asset_uuid: str) -> dict | None:
    """The row FTS would hold for `asset_uuid`, or None."""
    with _lock:
        if asset_uuid in _dropped:
            return None
    answer = _infos(asset_uuid)
    if answer.status_code == 200:
        return {k: v for k, v in answer.json().items() if k in ROW_FIELDS}
    if answer.status_code == 404:
        with _lock:
            if asset_uuid in _deleted_through_api and asset_uuid in _uploaded:
                return {k: v for k, v in _uploaded[asset_uuid].items() if k in ROW_FIELDS}
        return None
    raise RuntimeError(f'assetd answered {answer.status_code} to GET /api/assets/infos for {asset_uuid} asked as '
                       f'FileTransferService itself: {answer.text[:500]}')


def drop(asset_uuid: str) -> bool:
    """What FTS's `delete_file_asset` does (remove the file and the row), with assetd: the row
    goes from this view and assetd gets the event on which FTS runs `delete_file_asset` in a
    deployment, TeraServer's DB_DELETE for the asset. True when assetd no longer has the asset
    afterwards (FTS answers False when the file was already gone; so does this, then)."""
    with _lock:
        _dropped.add(asset_uuid)
        uploaded = _uploaded.get(asset_uuid, {})
    if _infos(asset_uuid).status_code == 404:
        return False
    id_asset = uploaded.get('id_asset')
    if id_asset is None:
        asset = TeraAsset.get_asset_by_uuid(asset_uuid, with_deleted=True)
        id_asset = asset.id_asset if asset else 0
    _publish_asset_deleted(id_asset, asset_uuid)
    deadline = time.monotonic() + DROP_WAIT_SECONDS
    while time.monotonic() < deadline:
        if _infos(asset_uuid).status_code == 404:
            return True
        time.sleep(0.1)
    warnings.warn(f'assetd still serves asset {asset_uuid} {DROP_WAIT_SECONDS}s after TeraServer\'s DB_DELETE event '
                  f'for it (FTS deletes the file when that event arrives)')
    return False


def _service_credentials() -> tuple[str, str, bytes]:
    """FTS's uuid, a service token for it and the service token key, from Redis, as FTS gets them."""
    client = settings.redis_client()
    record = client.get(RedisVars.RedisVar_ServicePrefixKey + 'FileTransferService')
    key = client.get(RedisVars.RedisVar_ServiceTokenAPIKey)
    if record is None or key is None:
        raise RuntimeError('the FileTransferService record or the service token key is missing from Redis')
    service_uuid = json.loads(record)['service_uuid']
    # As ServiceOpenTera.service_generate_token: no expiry.
    token = jwt.encode({'iat': int(time.time()), 'service_uuid': service_uuid}, key, algorithm='HS256')
    return service_uuid, token, key


def _infos(asset_uuid: str):
    service_uuid, token, key = _service_credentials()
    access_token = TeraAsset.get_access_token(asset_uuids=[asset_uuid], token_key=key, requester_uuid=service_uuid,
                                              expiration=1800)
    answer = assetd.send('GET', 'assets/infos', urlencode({'asset_uuid': asset_uuid, 'access_token': access_token}),
                         headers=[('Authorization', 'OpenTera ' + token)])
    answer.content  # read it all, so the connection goes back to the pool
    return answer


def _publish_asset_deleted(id_asset: int, asset_uuid: str) -> None:
    """TeraServer's message when an asset row is deleted (DBManager.setup_events_for_class,
    `after_delete`, with TeraAsset.to_json_delete_event)."""
    from teraserver_double.events import publish_database_event
    publish_database_event(messages.DatabaseEvent.DB_DELETE, 'asset',
                           {'id_asset': id_asset, 'asset_uuid': asset_uuid})

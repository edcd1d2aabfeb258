"""OpenTera's archive worker (`workers/AssetsArchiveWorker.py` of the `opentera` wheel, unchanged)
building an archive of a session's assets and uploading it into assetd.

Our test, not OpenTera's: scripts/opentera-tests collects it after OpenTera's FileTransferService
tests, with the same PYTHONPATH and environment (see tests/opentera/README.md). The test plays
TeraServer's `GET /api/user/assets/archive` (modules/FlaskModule/API/user/UserQueryAssetsArchive.py
of OpenTera's repository, the same at v1.3.0 and later): it records the archive on FTS (assetd),
builds the worker's job information as that resource does, stores it in Redis and starts the
worker with TeraServer's command line. The worker then marks the archive in progress, downloads
every asset from FTS, zips them and uploads the zip, all over HTTP to assetd.

Who goes through nginx, as in OpenTera:
- the user's requests (uploads, the archive's infos, download and delete): `/api/file/...` of the
  tests' app, which the harness sends to the run's nginx (`/file/api/...`), as a client reaches
  FTS through OpenTera's nginx;
- the user's request to TeraServer (`GET /api/user/assets/archive`, played here) came through
  nginx too: the job's `server_name` and `port` are what nginx announced in X_ExternalServer and
  X-ExternalPort, so the run's nginx (127.0.0.1 and its port; 40075 when run directly);
- not TeraServer's requests to FTS nor the worker's: UserQueryAssetsArchive builds
  `http://<service_hostname>:<service_port>/api/archives[/infos]` from FTS's service record, and the
  worker fetches `http://<service_hostname>:<service_port>/api/assets` from the `assets_map` (its
  nginx URL, `'https://' + server_name + ':' + port + service_endpoint + '/api/assets'`, is
  commented out in the worker). Those go to FTS itself, without nginx and without its headers,
  and so do they here.

Where this run differs from a deployment, on purpose and only there:
- FTS's service record says 127.0.0.1:4042 (OpenTera's test data); FTS is assetd, at
  127.0.0.1:$ASSETD_PORT, and that is where TeraServer's URLs and `assets_map` point;
- the worker's config file names the run's private Redis, not 6379.
"""
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile

import opentera.messages.python as messages
import redis
import requests
from opentera.db.models.TeraAsset import TeraAsset
from opentera.db.models.TeraService import TeraService
from opentera.db.models.TeraSession import TeraSession
from opentera.db.models.TeraUser import TeraUser
from opentera.redis.RedisVars import RedisVars
from opentera.services.ServiceAccessManager import ServiceAccessManager

from ot_harness import settings
from tests.services.FileTransferService.BaseFileTransferServiceAPITest import BaseFileTransferServiceAPITest

# FTS publishes its archive events there (ServiceOpenTera.send_service_event_message).
EVENT_CHANNEL = RedisVars.build_service_event_topic('FileTransferService')

# FTS's TeraArchiveStatus.
STATUS_PENDING, STATUS_INPROGRESS, STATUS_COMPLETED, STATUS_CANCELLED, STATUS_DELETED = range(5)

# How long an expected event may take to arrive; how long the worker may run.
EVENT_WAIT_SECONDS = 10
WORKER_TIMEOUT_SECONDS = 120


def _wheel_files() -> str:
    """Where the script copied the wheel's tests/ and workers/ for this run."""
    path = os.environ.get('OPENTERA_WHEEL_FILES', '')
    if not os.path.isfile(os.path.join(path, 'workers', 'AssetsArchiveWorker.py')):
        raise RuntimeError('OPENTERA_WHEEL_FILES does not name the copy of the wheel\'s workers/: '
                           'run these tests with scripts/opentera-tests')
    return path


class ArchiveEvents:
    """Every message on FTS's event channel, from the moment of construction, decoded as the
    OpenTera websocket layer does: a `TeraEvent` whose `Any` holds an `ArchiveEvent`."""

    def __init__(self):
        config = settings.redis_config()
        self._client = redis.Redis(host=config['hostname'], port=config['port'], db=config['db'],
                                   client_name='opentera-tests-archive-events')
        self._pubsub = self._client.pubsub()
        self._pubsub.subscribe(EVENT_CHANNEL)
        # Redis has registered the subscription once it confirms it: nothing published after
        # that is missed.
        deadline = time.monotonic() + 5
        while True:
            message = self._pubsub.get_message(timeout=1)
            if message and message['type'] == 'subscribe':
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f'no confirmation of the subscription to {EVENT_CHANNEL}')
        self._condition = threading.Condition()
        self._received = []  # (topic, version, number of events, ArchiveEvent or None, raw bytes)
        self._markers = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name='archive-events', daemon=True)
        self._thread.start()

    def _listen(self):
        while not self._stop.is_set():
            try:
                message = self._pubsub.get_message(timeout=0.1)
            except (redis.ConnectionError, ValueError):
                return  # closed
            if not message or message['type'] != 'message':
                continue
            data = message['data']
            with self._condition:
                if data in self._markers:
                    self._markers.discard(data)
                else:
                    self._received.append(self._decode(data))
                self._condition.notify_all()

    @staticmethod
    def _decode(data: bytes):
        try:
            tera_event = messages.TeraEvent.FromString(data)
        except Exception:  # noqa: BLE001 (anything undecodable is kept as it is, to be reported)
            return None, None, 0, None, data
        archive_event = messages.ArchiveEvent()
        if not tera_event.events or not tera_event.events[0].Unpack(archive_event):
            archive_event = None
        return tera_event.header.topic, tera_event.header.version, len(tera_event.events), archive_event, data

    def for_archive(self, archive_uuid: str) -> list:
        with self._condition:
            return [entry for entry in self._received if entry[3] is not None and entry[3].archive_uuid == archive_uuid]

    def undecodable(self) -> list:
        with self._condition:
            return [entry[4] for entry in self._received if entry[3] is None]

    def wait_for(self, archive_uuid: str, status: int) -> bool:
        deadline = time.monotonic() + EVENT_WAIT_SECONDS
        with self._condition:
            while not any(entry[3] is not None and entry[3].archive_uuid == archive_uuid and entry[3].status == status
                          for entry in self._received):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def flush(self):
        """Returns once everything published on the channel before this call has been received:
        Redis delivers a channel's messages in the order it processes the PUBLISHes, and assetd
        publishes an event before it answers the request that caused it."""
        marker = b'ot-harness-marker-' + uuid.uuid4().hex.encode()
        with self._condition:
            self._markers.add(marker)
        self._client.publish(EVENT_CHANNEL, marker)
        deadline = time.monotonic() + EVENT_WAIT_SECONDS
        with self._condition:
            while marker in self._markers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f'a message published on {EVENT_CHANNEL} did not come back within '
                                         f'{EVENT_WAIT_SECONDS}s')
                self._condition.wait(remaining)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()
        self._client.close()


class AssetsArchiveWorkerTest(BaseFileTransferServiceAPITest):
    asset_endpoint = '/api/file/assets'
    archive_endpoint = '/api/file/archives'
    archive_infos_endpoint = '/api/file/archives/infos'

    # Every asset this class uploaded, in upload order: asset_uuid -> (asset_name, bytes). The
    # session's archive holds them all, whichever test uploaded them.
    uploaded: dict = {}

    def setUp(self):
        # Before anything else: no event of the test may be missed.
        self.events = ArchiveEvents()
        self.addCleanup(self.events.close)
        super().setUp()
        with self.app_context():
            self.owner = TeraUser.get_user_by_username('admin')
            self.owner_uuid = self.owner.user_uuid
            self.owner_token = self.owner.get_token(ServiceAccessManager.api_user_token_key)
            other = TeraUser.get_user_by_username('user')
            self.assertTrue(other.user_enabled)
            self.other_token = other.get_token(ServiceAccessManager.api_user_token_key)
            fts = TeraService.get_service_by_key('FileTransferService')
            self.fts_uuid = fts.service_uuid
            self.fts_token = fts.get_token(ServiceAccessManager.api_service_token_key)
            # The session FTS's own tests upload to: the one FTS created.
            self.id_session = TeraSession.query.filter(TeraSession.id_creator_service == fts.id_service) \
                .first().id_session

    # --- as a user of OpenTera's API --------------------------------------------------------

    def _upload_assets(self) -> list:
        """Three assets on the session, as the admin user, two of them with the same asset name
        (different files): their uuids."""
        tag = uuid.uuid4().hex[:8]
        files = [
            (f'{tag}-scan.bin', 'scan-left.raw', 'application/octet-stream', os.urandom(300 * 1024 + 17)),
            (f'{tag}-scan.bin', 'scan-right.raw', 'application/octet-stream', os.urandom(64 * 1024 + 3)),
            (f'{tag}-notes.txt', 'notes.txt', 'text/plain', f'Notes {tag}\nline 2\n'.encode()),
        ]
        uuids = []
        for asset_name, filename, asset_type, data in files:
            file_asset = {'id_session': self.id_session, 'asset_name': asset_name, 'asset_type': asset_type}
            response = self._post_file_with_token_auth(
                self.test_client, token=self.owner_token, endpoint=self.asset_endpoint,
                files={'file': (io.BytesIO(data), filename), 'file_asset': json.dumps(file_asset)})
            self.assertEqual(200, response.status_code, f'upload of {filename}: {response.data[:500]!r}')
            asset_uuid = response.json['asset_uuid']
            # FTS's answer names where clients reach it, from nginx's headers: the run's nginx.
            self.assertEqual(f'https://{settings.EXTERNAL_SERVER}:{settings.external_port()}/file/api/assets',
                             response.json.get('asset_url'))
            self.uploaded[asset_uuid] = (asset_name, data)
            uuids.append(asset_uuid)
        return uuids

    def _archive_infos(self, archive_uuid: str, token: str):
        return self._get_with_token_auth(self.test_client, token=token, params={'archive_uuid': archive_uuid},
                                         endpoint=self.archive_infos_endpoint)

    def _download_archive(self, archive_uuid: str, token: str):
        return self._get_with_token_auth(self.test_client, token=token, params={'archive_uuid': archive_uuid},
                                         endpoint=self.archive_endpoint)

    # --- as TeraServer ----------------------------------------------------------------------

    def _fts_location(self, service: TeraService) -> tuple:
        """Where TeraServer reaches a service: its record's hostname and port; for FTS, assetd."""
        if service.service_key == 'FileTransferService':
            return '127.0.0.1', settings.assetd_port()
        return service.service_hostname, service.service_port

    def _start_archive_job(self) -> tuple:
        """What UserQueryAssetsArchive.get does for `id_session` and the owner, up to the worker's
        start: returns (job_id, job_info, FTS's answer when the archive was recorded)."""
        client = settings.redis_client()
        with self.app_context():
            asset_map_per_service = {}
            service_key: bytes = client.get(RedisVars.RedisVar_ServiceTokenAPIKey)
            for service in TeraService.query_with_filters({'service_enabled': True}):
                if service.service_key == 'OpenTeraServer':
                    continue
                hostname, port = self._fts_location(service)
                asset_map_per_service[service.service_key] = {'service_uuid': service.service_uuid,
                                                              'service_assets': [],
                                                              'service_hostname': hostname,
                                                              'service_port': port,
                                                              'service_endpoint': service.service_clientendpoint,
                                                              'service_token': service.get_token(service_key)}

            # The user's request came through nginx, which names itself in these headers
            # (X_ExternalServer, X-ExternalPort): the run's nginx.
            server_name = settings.EXTERNAL_SERVER
            port = str(settings.external_port())

            def add_asset_to_list(asset: TeraAsset, path: str = ''):
                value = asset.to_json(minimal=False)
                value['path'] = f'{path}'
                current_service = TeraService.get_service_by_uuid(asset.asset_service_uuid)
                if current_service.service_key in asset_map_per_service:
                    asset_map_per_service[current_service.service_key]['service_assets'].append(value)

            def get_assets_for_session(sess: TeraSession, path: str = ''):
                for asset in TeraAsset.get_assets_for_session(sess.id_session):
                    add_asset_to_list(asset, path + f'/{sess.id_session}_{sess.session_name}')

            # id_session given
            sess = TeraSession.get_session_by_id(self.id_session)
            if len(sess.session_participants) == 0:
                get_assets_for_session(sess)
            else:
                for participant in sess.session_participants:
                    project = participant.participant_project
                    site = project.project_site
                    get_assets_for_session(sess, f'{site.site_name}/{project.project_name}/'
                                                 f'{participant.participant_name}')

            now = datetime.datetime.now()
            job_id = f"worker.id.user.{self.owner_uuid}.{now.strftime('%Y-%m-%d_%H-%M-%S')}"
            asset_map_per_service = {k: v for k, v in asset_map_per_service.items() if len(v['service_assets']) > 0}
            archive_name = f"{now.strftime('%Y-%m-%d_%H-%M-%S')}_archive.zip"
            archive_info = {'archive': {'id_archive_file_data': 0,
                                        'archive_original_filename': archive_name,
                                        'archive_owner_uuid': self.owner_uuid}}

            file_transfer_service = TeraService.get_service_by_key('FileTransferService')
            file_transfer_service_token = file_transfer_service.get_token(service_key)
            fts_host, fts_port = self._fts_location(file_transfer_service)
            archive_file_infos_url = f'http://{fts_host}:{fts_port}/api/archives/infos'
            archive_file_upload_url = f'http://{fts_host}:{fts_port}/api/archives'

            response = requests.post(archive_file_infos_url, json=archive_info,
                                     headers={'Authorization': 'OpenTera ' + file_transfer_service_token},
                                     timeout=30, verify=False)
            # TeraServer answers 501 'Unable to create archive information from FileTransferService'.
            self.assertEqual(200, response.status_code, f'POST {archive_file_infos_url} as FTS: {response.text[:500]}')
            created = response.json()

            job_info = {'job_id': job_id,
                        'server_name': server_name,
                        'port': port,
                        'service_key': service_key.decode('utf-8'),
                        'archive_file_infos_url': archive_file_infos_url,
                        'archive_file_upload_url': archive_file_upload_url,
                        'service_token': file_transfer_service_token,
                        'assets_map': asset_map_per_service,
                        'archive_info': created}
            client.set(job_id, json.dumps(job_info), ex=60)
        return job_id, job_info, created

    def _run_worker(self, job_id: str) -> subprocess.CompletedProcess:
        """TeraServer's command line for the worker (its python, the wheel's script unchanged)."""
        redis_config = settings.redis_config()
        config = {
            'Server': {'name': 'OpenTera tests (assetd)', 'hostname': settings.EXTERNAL_SERVER,
                       'port': settings.EXTERNAL_PORT, 'use_ssl': False, 'ssl_path': 'config/certificates',
                       'site_certificate': 'site_cert.pem', 'site_private_key': 'site_key.pem',
                       'ca_certificate': 'ca_cert.pem', 'ca_private_key': 'ca_key.pem', 'upload_path': 'uploads',
                       'debug_mode': False, 'enable_docs': False},
            # The worker reads no database; load_config needs the section.
            'Database': {'db_type': 'QPSQL', 'name': 'opentera', 'url': '127.0.0.1', 'port': 5432,
                         'username': 'teraagent', 'password': 'tera'},
            'Redis': {'hostname': redis_config['hostname'], 'port': redis_config['port'], 'db': redis_config['db'],
                      'username': redis_config['username'], 'password': redis_config['password']},
        }
        with tempfile.TemporaryDirectory(prefix='archive-worker-') as directory:
            config_path = os.path.join(directory, 'TeraServerConfig.ini')
            with open(config_path, 'w', encoding='utf8') as file:
                json.dump(config, file)
            command = [sys.executable, 'workers/AssetsArchiveWorker.py', '--config', config_path, '--job_id', job_id]
            return subprocess.run(command, cwd=_wheel_files(), capture_output=True, text=True,
                                  timeout=WORKER_TIMEOUT_SECONDS)

    def _archive_by_worker(self) -> tuple:
        """Uploads three assets, starts the job as TeraServer does and runs the worker to its end:
        (job_info, the archive as first recorded, the uuids of the assets uploaded)."""
        uuids = self._upload_assets()
        job_id, job_info, created = self._start_archive_job()
        self.assertEqual(STATUS_PENDING, created['archive_status'])
        self.assertEqual(self.owner_uuid, created['archive_owner_uuid'])
        self.assertNotEqual(0, created['id_archive_file_data'])

        worker = self._run_worker(job_id)
        report = f'worker exit {worker.returncode}\n--- stdout\n{worker.stdout}\n--- stderr\n{worker.stderr}'
        self.assertEqual(0, worker.returncode, report)
        # The worker exits 0 whatever happened; its last line gives the upload's status.
        codes = re.findall(r'Duration: [0-9.e+-]+, return code: (\d+)', worker.stdout)
        self.assertEqual(['200'], codes, report)
        return job_info, created, uuids

    def _expected_entries(self, job_info: dict) -> dict:
        """The zip's entries: every asset of the job, named as the worker names them (its
        `path`/`asset_name`, a repeated name getting `(2)`, `(3)`… before its extension), with
        the bytes uploaded."""
        entries = {}
        seen = {}
        for service_data in job_info['assets_map'].values():
            for asset in service_data['service_assets']:
                self.assertIn(asset['asset_uuid'], self.uploaded, 'an asset of the session this test did not upload')
                name, data = self.uploaded[asset['asset_uuid']]
                self.assertEqual(name, asset['asset_name'])
                key = f"{asset['path']}/{name}"
                if key in seen:
                    seen[key] += 1
                    stem, extension = name.rsplit('.', 1)
                    key = f"{asset['path']}/{stem}({seen[key]}).{extension}"
                else:
                    seen[key] = 1
                entries[key] = data
        return entries

    def _assert_events(self, archive_uuid: str, statuses: list):
        self.events.flush()
        received = self.events.for_archive(archive_uuid)
        self.assertEqual([], self.events.undecodable(), 'messages on the channel that are not a TeraEvent')
        self.assertEqual(statuses, [entry[3].status for entry in received])
        for topic, version, count, event, _ in received:
            self.assertEqual(EVENT_CHANNEL, topic)
            self.assertEqual(1, version)
            self.assertEqual(1, count)
            self.assertEqual(self.owner_uuid, event.owner_uuid)
            self.assertEqual(f'/file/api/archives?archive_uuid={archive_uuid} ', event.archive_url)

    # --- the tests --------------------------------------------------------------------------

    def test_worker_builds_and_uploads_the_archive(self):
        job_info, created, uuids = self._archive_by_worker()
        archive_uuid = created['archive_uuid']
        with self.app_context():
            # The job holds the session's assets (this test's three, and any other test's of
            # this class), all under FTS.
            fts_assets = job_info['assets_map']['FileTransferService']['service_assets']
            self.assertEqual(set(self.uploaded), {asset['asset_uuid'] for asset in fts_assets})
            self.assertEqual(['FileTransferService'], list(job_info['assets_map']))

            # FTS's record of the archive, as the owner and as a service.
            response = self._archive_infos(archive_uuid, self.owner_token)
            self.assertEqual(200, response.status_code, response.data[:500])
            infos = response.json
            self.assertEqual(infos, self._archive_infos(archive_uuid, self.fts_token).json)
            self.assertEqual(STATUS_COMPLETED, infos['archive_status'])
            self.assertEqual(self.fts_uuid, infos['archive_uploader_uuid'])
            self.assertEqual(self.owner_uuid, infos['archive_owner_uuid'])
            self.assertEqual(created['id_archive_file_data'], infos['id_archive_file_data'])
            self.assertEqual(created['archive_original_filename'], infos['archive_original_filename'])
            self.assertIsNotNone(infos['archive_upload_datetime'])
            self.assertGreater(infos['archive_file_size'], 0)

            # The owner downloads it: every asset, its exact bytes, the worker's names.
            response = self._download_archive(archive_uuid, self.owner_token)
            self.assertEqual(200, response.status_code, response.data[:500])
            self.assertEqual(infos['archive_file_size'], len(response.data))
            with zipfile.ZipFile(io.BytesIO(response.data)) as archive:
                self.assertIsNone(archive.testzip())
                names = archive.namelist()
                self.assertEqual(len(names), len(set(names)), f'repeated entries: {names}')
                contents = {name: archive.read(name) for name in names}
            expected = self._expected_entries(job_info)
            self.assertEqual(sorted(expected), sorted(contents))
            for name, data in expected.items():
                self.assertEqual(data, contents[name], f'bytes of {name}')
            # This test's pair of same-named assets: `name` then `name(2)`, in upload order.
            scan = self.uploaded[uuids[0]][0]
            path = next(a['path'] for a in fts_assets if a['asset_uuid'] == uuids[0])
            self.assertEqual(self.uploaded[uuids[0]][1], contents[f'{path}/{scan}'])
            self.assertEqual(self.uploaded[uuids[1]][1], contents[f"{path}/{scan.replace('.bin', '(2).bin')}"])

            # Nobody else may download it or see it.
            response = self._download_archive(archive_uuid, self.other_token)
            self.assertEqual(403, response.status_code, response.data[:500])
            response = self._archive_infos(archive_uuid, self.other_token)
            self.assertEqual(403, response.status_code, response.data[:500])

            self._assert_events(archive_uuid, [STATUS_PENDING, STATUS_INPROGRESS, STATUS_COMPLETED])

            # The owner deletes it.
            response = self._delete_with_token_auth(self.test_client, token=self.owner_token,
                                                    params={'uuid': archive_uuid}, endpoint=self.archive_endpoint)
            self.assertEqual(200, response.status_code, response.data[:500])
            self.assertEqual('Archive deleted', response.json)
            self.assertTrue(self.events.wait_for(archive_uuid, STATUS_DELETED), 'no event for the deletion')
            response = self._archive_infos(archive_uuid, self.owner_token)
            self.assertEqual(404, response.status_code, response.data[:500])
            response = self._download_archive(archive_uuid, self.owner_token)
            self.assertEqual(404, response.status_code, response.data[:500])
            self._assert_events(archive_uuid,
                                [STATUS_PENDING, STATUS_INPROGRESS, STATUS_COMPLETED, STATUS_DELETED])

    def test_second_upload_of_an_archive_is_refused(self):
        job_info, created, _ = self._archive_by_worker()
        archive_uuid = created['archive_uuid']
        with self.app_context():
            before = self._archive_infos(archive_uuid, self.fts_token)
            self.assertEqual(200, before.status_code, before.data[:500])
            self.assertEqual(STATUS_COMPLETED, before.json['archive_status'])
            zip_before = self._download_archive(archive_uuid, self.owner_token)
            self.assertEqual(200, zip_before.status_code, zip_before.data[:500])

            # The worker's upload again, for the same archive, with other bytes.
            archive_info = dict(job_info['archive_info'], archive_status=STATUS_INPROGRESS)
            other_zip = io.BytesIO()
            with zipfile.ZipFile(other_zip, 'w') as archive:
                archive.writestr('other.txt', b'not the archive')
            other_zip.seek(0)
            response = requests.post(job_info['archive_file_upload_url'],
                                     files={'file': (archive_info['archive_original_filename'], other_zip)},
                                     data={'archive': json.dumps(archive_info)}, timeout=30,
                                     headers={'Authorization': 'OpenTera ' + job_info['service_token']})
            self.assertEqual(404, response.status_code, response.text[:500])
            self.assertEqual('Archive has already been uploaded.', response.json())

            # Unchanged, and nothing announced.
            after = self._archive_infos(archive_uuid, self.fts_token)
            self.assertEqual(200, after.status_code, after.data[:500])
            self.assertEqual(before.json, after.json)
            zip_after = self._download_archive(archive_uuid, self.owner_token)
            self.assertEqual(200, zip_after.status_code, zip_after.data[:500])
            self.assertEqual(zip_before.data, zip_after.data)
            self._assert_events(archive_uuid, [STATUS_PENDING, STATUS_INPROGRESS, STATUS_COMPLETED])

            # Its uploader (FTS, a service) may delete it too.
            response = self._delete_with_token_auth(self.test_client, token=self.fts_token,
                                                    params={'uuid': archive_uuid}, endpoint=self.archive_endpoint)
            self.assertEqual(200, response.status_code, response.data[:500])
            self.assertTrue(self.events.wait_for(archive_uuid, STATUS_DELETED), 'no event for the deletion')

"""TeraServer's endpoints that FTS and its tests call, on the namespaces FakeFileTransferService
creates (`/api/service`, `/api/user`, `/api/participant`, `/api/device`).

Each resource follows the TeraServer resource of the same name (OpenTera's
modules/FlaskModule/API/<namespace>/<Name>.py): arguments, checks in the same order, status
codes, messages and answer shapes (the models' own to_json). Endpoints and methods FTS does not
use are not here: the tests' Flask app answers 404 or 405 for them.
"""
from flask import g, request
from flask_babel import gettext
from flask_restx import Namespace, Resource, inputs, reqparse
from opentera.db.models.TeraAsset import TeraAsset
from opentera.db.models.TeraDevice import TeraDevice
from opentera.db.models.TeraParticipant import TeraParticipant
from opentera.db.models.TeraProject import TeraProject
from opentera.db.models.TeraService import TeraService
from opentera.db.models.TeraSession import TeraSession
from opentera.db.models.TeraSessionEvent import TeraSessionEvent
from opentera.db.models.TeraSessionType import TeraSessionType
from opentera.db.models.TeraUser import TeraUser
from opentera.redis.RedisVars import RedisVars
from sqlalchemy import exc

from ot_harness import settings
from teraserver_double import auth
from teraserver_double.access import DeviceAccess, ParticipantAccess, ServiceAccess, UserAccess


class _DoubleResource(Resource):
    """TeraServer's resources take the Flask module (for its config) and the test flag."""

    def __init__(self, _api, *args, **kwargs):
        Resource.__init__(self, _api, *args, **kwargs)
        self.module = kwargs.get('flaskModule', None)
        self.test = kwargs.get('test', False)

    def external_server(self) -> tuple[str, str]:
        """The host and port clients reach TeraServer at: from nginx's headers when present."""
        servername = self.module.config.server_config['hostname']
        port = self.module.config.server_config['port']
        if 'X_EXTERNALSERVER' in request.headers:
            servername = request.headers['X_EXTERNALSERVER']
        if 'X_EXTERNALPORT' in request.headers:
            port = request.headers['X_EXTERNALPORT']
        return servername, str(port)


def _assets_answer(resource: _DoubleResource, assets, requester_uuid: str, with_urls: bool, with_only_token: bool,
                   services: list, to_json) -> list:
    """The asset list of the GET */assets endpoints. With `with_urls` or `with_only_token`, each
    asset gets its own access token (HS256, service key, `asset_uuids` a single uuid string,
    30 minutes); with `with_urls`, the info and download URLs of the service that owns it."""
    servername, port = resource.external_server()
    endpoints = {service.service_uuid: service.service_clientendpoint for service in services} \
        if (with_urls or with_only_token) and assets else {}
    token_key = settings.redis_client().get(RedisVars.RedisVar_ServiceTokenAPIKey)
    answer = []
    for asset in assets:
        asset_json = {'asset_uuid': asset.asset_uuid} if with_only_token else to_json(asset)
        if with_urls or with_only_token:
            asset_json['access_token'] = TeraAsset.get_access_token(asset_uuids=asset.asset_uuid, token_key=token_key,
                                                                    requester_uuid=requester_uuid, expiration=1800)
        if with_urls:
            if asset.asset_service_uuid in endpoints:
                base = 'https://' + servername + ':' + port + endpoints[asset.asset_service_uuid]
                asset_json['asset_infos_url'] = base + '/api/assets/infos'
                asset_json['asset_url'] = base + '/api/assets'
            else:
                asset_json['asset_infos_url'] = None
                asset_json['asset_url'] = None
        answer.append(asset_json)
    return answer


def _enabled_services() -> list:
    return TeraService.query.filter(TeraService.service_enabled == True).all()  # noqa: E712 (SQL expression)


# --- /api/service -----------------------------------------------------------------------

_service_sessions_get = reqparse.RequestParser()
for _name, _type in (('id_session', int), ('uuid_session', str), ('id_participant', int), ('id_user', int),
                     ('id_device', int), ('list', inputs.boolean), ('with_events', inputs.boolean),
                     ('with_session_type', inputs.boolean), ('status', int), ('limit', int), ('offset', int),
                     ('start_date', inputs.date), ('end_date', inputs.date)):
    _service_sessions_get.add_argument(_name, type=_type)


class ServiceQuerySessions(_DoubleResource):
    @auth.service_token_required
    def get(self):
        args = _service_sessions_get.parse_args()
        access = ServiceAccess(g.current_service)
        period = dict(status=args['status'], limit=args['limit'], offset=args['offset'],
                      start_date=args['start_date'], end_date=args['end_date'])
        if args['id_session']:
            # An unknown session is one the service cannot see: 403, as in TeraServer.
            if args['id_session'] not in access.sessions_ids():
                return gettext('Forbidden'), 403
            sessions = [TeraSession.get_session_by_id(args['id_session'])]
        elif args['uuid_session']:
            session = TeraSession.get_session_by_uuid(args['uuid_session'])
            if session and session.id_session not in access.sessions_ids():
                return gettext('Forbidden'), 403
            sessions = [session] if session else []
        elif args['id_participant']:
            if args['id_participant'] not in access.participants_ids():
                return gettext('Forbidden'), 403
            sessions = TeraSession.get_sessions_for_participant(part_id=args['id_participant'], **period)
        elif args['id_user']:
            if args['id_user'] not in access.users_ids():
                return gettext('Forbidden'), 403
            sessions = TeraSession.get_sessions_for_user(user_id=args['id_user'], **period)
        elif args['id_device']:
            if args['id_device'] not in access.devices_ids():
                return gettext('Forbidden'), 403
            sessions = TeraSession.get_sessions_for_device(device_id=args['id_device'], **period)
        else:
            return gettext('Missing arguments: at least one id is required'), 400

        answer = []
        for session in sessions:
            session_json = session.to_json(minimal=args['list'])
            if args['with_session_type']:
                session_json['session_type'] = TeraSessionType.get_session_type_by_id(session.id_session_type).to_json()
            if args['with_events']:
                session_json['session_events'] = [e.to_json(minimal=args['list'])
                                                  for e in TeraSessionEvent.get_events_for_session(session.id_session)]
            answer.append(session_json)
        return answer


_service_assets_get = reqparse.RequestParser()
for _name, _type in (('id_asset', int), ('id_device', int), ('id_session', int), ('id_participant', int),
                     ('id_user', int), ('service_uuid', str), ('id_creator_service', int), ('id_creator_user', int),
                     ('id_creator_participant', int), ('id_creator_device', int), ('with_urls', inputs.boolean),
                     ('with_only_token', inputs.boolean)):
    _service_assets_get.add_argument(_name, type=_type)

_service_assets_delete = reqparse.RequestParser()
_service_assets_delete.add_argument('uuid', type=str, help='Asset UUID to delete', required=True)


class ServiceQueryAssets(_DoubleResource):
    @auth.service_token_required
    def get(self):
        access = ServiceAccess(g.current_service)
        args = _service_assets_get.parse_args()
        if not any(args.values()):
            return gettext('No arguments specified'), 400
        if args['id_device']:
            if args['id_device'] not in access.devices_ids():
                return gettext('Device access denied'), 403
            assets = TeraAsset.get_assets_for_device(device_id=args['id_device'])
        elif args['id_session']:
            if args['id_session'] not in access.sessions_ids():
                return gettext('Session access denied'), 403
            assets = TeraAsset.get_assets_for_session(session_id=args['id_session'])
        elif args['id_participant']:
            if args['id_participant'] not in access.participants_ids():
                return gettext('Participant access denied'), 403
            assets = TeraAsset.get_assets_for_participant(part_id=args['id_participant'])
        elif args['id_user']:
            if args['id_user'] not in access.users_ids():
                return gettext('User access denied'), 403
            assets = TeraAsset.get_assets_for_user(user_id=args['id_user'])
        elif args['id_creator_service']:
            assets = TeraAsset.get_assets_created_by_service(service_id=args['id_creator_service'])
        elif args['id_creator_user']:
            if args['id_creator_user'] not in access.users_ids():
                return gettext('User access denied'), 403
            assets = TeraAsset.get_assets_created_by_user(user_id=args['id_creator_user'])
        elif args['id_creator_participant']:
            if args['id_creator_participant'] not in access.participants_ids():
                return gettext('Participant access denied'), 403
            assets = TeraAsset.get_assets_created_by_participant(participant_id=args['id_creator_participant'])
        elif args['id_creator_device']:
            if args['id_creator_device'] not in access.devices_ids():
                return gettext('Device access denied'), 403
            assets = TeraAsset.get_assets_created_by_device(device_id=args['id_creator_device'])
        elif args['id_asset']:
            assets = access.query_asset(args['id_asset'])
        elif args['service_uuid']:
            assets = TeraAsset.get_assets_owned_by_service(service_uuid=args['service_uuid'])
        else:
            return gettext('Missing argument'), 400
        return _assets_answer(self, assets, g.current_service.service_uuid, args['with_urls'], args['with_only_token'],
                              _enabled_services(), lambda asset: asset.to_json())

    @auth.service_token_required
    def post(self):
        """Create (`id_asset` 0: the double assigns `id_asset` and `asset_uuid`) or update an asset;
        answers `[asset]`. The owner is always the calling service."""
        access = ServiceAccess(g.current_service)
        if 'asset' not in request.json:
            return gettext('Missing asset field'), 400
        asset_info = request.json['asset']
        if 'id_asset' not in asset_info:
            return gettext('Missing id_asset field'), 400
        if asset_info['id_asset'] == 0:
            if 'id_session' not in asset_info:
                return gettext('Unknown session'), 400
            if not asset_info.get('asset_type'):
                return gettext('Invalid asset type'), 400
        # TeraServer's own test here fails with a 500 when the name is missing; the double
        # answers what that test means to.
        if not asset_info.get('asset_name') and asset_info['id_asset'] == 0:
            return gettext('Invalid asset name'), 400
        if asset_info['id_asset'] != 0 and 'id_session' not in asset_info:
            asset = TeraAsset.get_asset_by_id(asset_info['id_asset'])
            if asset:
                asset_info['id_session'] = asset.id_session
        if asset_info.get('id_session') not in access.sessions_ids():
            return gettext('Service can\'t create assets for that session'), 403

        # Creators may be named by uuid.
        for uuid_field, id_field, model, finder, message in (
                ('participant_uuid', 'id_participant', TeraParticipant, 'get_participant_by_uuid', 'Invalid participant'),
                ('user_uuid', 'id_user', TeraUser, 'get_user_by_uuid', 'Invalid user'),
                ('device_uuid', 'id_device', TeraDevice, 'get_device_by_uuid', 'Invalid device')):
            if uuid_field in asset_info:
                creator = getattr(model, finder)(asset_info.pop(uuid_field))
                if not creator:
                    return gettext(message), 400
                asset_info[id_field] = getattr(creator, id_field)

        try:
            if asset_info['id_asset'] == 0:
                new_asset = TeraAsset()
                new_asset.from_json(asset_info)
                new_asset.asset_service_uuid = g.current_service.service_uuid  # no asset for another service
                TeraAsset.insert(new_asset)  # assigns asset_uuid
                asset_info['id_asset'] = new_asset.id_asset
            else:
                if 'asset_service_uuid' in asset_info:
                    asset_info['asset_service_uuid'] = g.current_service.service_uuid
                TeraAsset.update(asset_info['id_asset'], asset_info)
        except exc.SQLAlchemyError:
            TeraAsset.db().session.rollback()
            return gettext('Database error'), 500
        return [TeraAsset.get_asset_by_id(asset_info['id_asset']).to_json()]

    @auth.service_token_required
    def delete(self):
        """A soft delete, as TeraServer's: the row stays, marked deleted (an update event)."""
        access = ServiceAccess(g.current_service)
        args = _service_assets_delete.parse_args()
        asset = TeraAsset.get_asset_by_uuid(args['uuid'])
        if not asset:
            return gettext('Missing arguments'), 400
        if asset.id_session not in access.sessions_ids():
            return gettext('Service can\'t delete assets for that session'), 403
        try:
            TeraAsset.delete(id_todel=asset.id_asset)
        except exc.SQLAlchemyError:
            TeraAsset.db().session.rollback()
            return gettext('Database error'), 500
        return '', 200


_service_services_get = reqparse.RequestParser()
for _name, _type in (('id_service', int), ('uuid_service', str), ('service_key', str),
                     ('with_base_url', inputs.boolean)):
    _service_services_get.add_argument(_name, type=_type)


class ServiceQueryServices(_DoubleResource):
    """What ServiceOpenTera's TeraServiceClient.get_service_infos asks (`uuid_service`)."""

    @auth.service_token_required
    def get(self):
        args = _service_services_get.parse_args()
        if not args['service_key'] and not args['id_service'] and not args['uuid_service']:
            return gettext('Missing service key, id or uuid'), 400
        # The last given wins, as in TeraServer.
        services = []
        if args['id_service']:
            services = [TeraService.get_service_by_id(args['id_service'])]
        if args['uuid_service']:
            services = [TeraService.get_service_by_uuid(args['uuid_service'])]
        if args['service_key']:
            services = [TeraService.get_service_by_key(args['service_key'])]
        answer = []
        for service in services:
            if service is None:
                continue  # TeraServer fails with a 500 here
            service_json = service.to_json(minimal=True)
            if args['with_base_url']:
                hostname, port = service.service_hostname, str(service.service_port)
                if hostname in ('localhost', '127.0.0.1'):
                    hostname, port = self.external_server()
                service_json['service_base_url'] = 'https://' + hostname + ':' + port + service.service_clientendpoint
            answer.append(service_json)
        return answer


# --- /api/user --------------------------------------------------------------------------

_user_login_get = reqparse.RequestParser()
_user_login_get.add_argument('with_websocket', type=inputs.boolean, default=False)


class UserLogin(_DoubleResource):
    @auth.user_login_required
    def get(self):
        """A user token for HTTP Basic credentials. The double has no websocket (UserManager) and
        no client-version table; asking for a websocket is refused as when one is not possible."""
        args = _user_login_get.parse_args(strict=True)
        user = g.current_user
        if args['with_websocket']:
            return gettext('Websockets are not available from the TeraServer test double'), 403
        if user.user_force_password_change:
            return {'message': gettext('Password change required for this user.'), 'reason': 'password_change',
                    'redirect_url': '/login_change_password'}
        if user.user_2fa_enabled:
            if user.user_2fa_otp_enabled and user.user_2fa_otp_secret:
                return {'message': gettext('2FA required for this user.'), 'reason': '2fa',
                        'redirect_url': '/login_validate_2fa'}
            return {'message': gettext('2FA enabled but OTP not set for this user.Please setup 2FA.'),
                    'reason': '2fa_setup', 'redirect_url': '/login_setup_2fa'}
        token_key = settings.redis_client().get(RedisVars.RedisVar_UserTokenAPIKey)
        return {'user_uuid': user.user_uuid, 'user_fullname': user.get_fullname(),
                'user_token': user.get_token(token_key)}


class UserLogout(_DoubleResource):
    @auth.user_required
    def get(self):
        """The token used joins `user_disabled_tokens`, which FTS checks on every request."""
        authorization = request.headers.get('Authorization', '')
        parts = authorization.split(None, 1)
        if len(parts) == 2 and parts[0] == 'OpenTera':
            auth.add_disabled_user_token(parts[1])
        return gettext('User logged out.'), 200


_user_assets_get = reqparse.RequestParser()
for _name, _type in (('id_asset', int), ('asset_uuid', str), ('id_device', int), ('id_session', int),
                     ('id_participant', int), ('id_user', int), ('service_uuid', str), ('id_creator_service', int),
                     ('id_creator_user', int), ('id_creator_participant', int), ('id_creator_device', int),
                     ('with_urls', inputs.boolean), ('with_only_token', inputs.boolean), ('full', inputs.boolean)):
    _user_assets_get.add_argument(_name, type=_type)


class UserQueryAssets(_DoubleResource):
    @auth.user_required
    def get(self):
        access = UserAccess(g.current_user)
        args = _user_assets_get.parse_args()
        if not any(args.values()):
            return gettext('No arguments specified'), 400
        if args['id_device']:
            if args['id_device'] not in access.devices_ids():
                return gettext('Device access denied'), 403
            assets = TeraAsset.get_assets_for_device(device_id=args['id_device'])
        elif args['id_session']:
            if not access.query_session(args['id_session']):
                return gettext('Session access denied'), 403
            assets = TeraAsset.get_assets_for_session(session_id=args['id_session'])
        elif args['id_participant']:
            if args['id_participant'] not in access.participants_ids():
                return gettext('Participant access denied'), 403
            assets = TeraAsset.get_assets_for_participant(part_id=args['id_participant'])
        elif args['id_user']:
            if args['id_user'] not in access.users_ids():
                return gettext('User access denied'), 403
            assets = TeraAsset.get_assets_for_user(user_id=args['id_user'])
        elif args['id_creator_service']:
            if args['id_creator_service'] not in access.services_ids():
                return gettext('Service access denied'), 403
            assets = TeraAsset.get_assets_created_by_service(service_id=args['id_creator_service'])
        elif args['id_creator_user']:
            if args['id_creator_user'] not in access.users_ids():
                return gettext('User access denied'), 403
            assets = TeraAsset.get_assets_created_by_user(user_id=args['id_creator_user'])
        elif args['id_creator_participant']:
            if args['id_creator_participant'] not in access.participants_ids():
                return gettext('Participant access denied'), 403
            assets = TeraAsset.get_assets_created_by_participant(participant_id=args['id_creator_participant'])
        elif args['id_creator_device']:
            if args['id_creator_device'] not in access.devices_ids():
                return gettext('Device access denied'), 403
            assets = TeraAsset.get_assets_created_by_device(device_id=args['id_creator_device'])
        elif args['id_asset']:
            assets = access.query_asset(id_asset=args['id_asset'])
        elif args['asset_uuid']:
            assets = access.query_asset(asset_uuid=args['asset_uuid'])
        elif args['service_uuid']:
            return gettext('service_uuid is not answered by the TeraServer test double'), 501
        else:
            return gettext('Missing argument'), 400
        if not assets:
            return []
        return _assets_answer(self, assets, g.current_user.user_uuid, args['with_urls'], args['with_only_token'],
                              _enabled_services(), lambda asset: asset.to_json(minimal=not args['full']))


_user_projects_get = reqparse.RequestParser()
for _name, _type in (('id_project', int), ('id', int), ('id_site', int), ('id_service', int), ('user_uuid', str),
                     ('name', str), ('enabled', inputs.boolean), ('list', inputs.boolean)):
    _user_projects_get.add_argument(_name, type=_type)


class UserQueryProjects(_DoubleResource):
    @auth.user_required
    def get(self):
        """The caller's projects, or with `user_uuid` another user's (FTS asks this to know
        whether a user is a project admin), each with `project_role`: that user's role."""
        access = UserAccess(g.current_user)
        args = _user_projects_get.parse_args()
        if args['id']:
            args['id_project'] = args['id']
        if args['id_project']:
            projects = [TeraProject.get_project_by_id(args['id_project'])] \
                if args['id_project'] in access.projects_ids() else []
        elif args['user_uuid']:
            queried = TeraUser.get_user_by_uuid(args['user_uuid'])
            projects = []
            if queried is not None:
                # TeraServer answers for any user, with the queried user's rights and roles.
                access = UserAccess(queried)
                projects = access.projects()
        elif args['id_service'] or args['id_site'] or args['name']:
            return gettext('This query is not answered by the TeraServer test double'), 501
        else:
            projects = access.projects()
        if args['list']:
            return gettext('list is not answered by the TeraServer test double'), 501
        answer = []
        for project in projects:
            if args['enabled'] is not None and project.project_enabled != args['enabled']:
                continue
            project_json = project.to_json()
            project_json['project_role'] = access.project_role(project.id_project)
            answer.append(project_json)
        return answer


# --- /api/participant and /api/device ----------------------------------------------------

_own_assets_get = reqparse.RequestParser()
_own_assets_get.add_argument('asset_uuid', type=str, default=None)
_own_assets_get.add_argument('id_asset', type=int, default=None)
_own_assets_get.add_argument('id_session', type=int, default=None)
_own_assets_get.add_argument('with_urls', type=inputs.boolean)
_own_assets_get.add_argument('with_only_token', type=inputs.boolean)


class ParticipantQueryAssets(_DoubleResource):
    @auth.participant_required
    def get(self):
        """The participant's assets. With its static token (limited access) a participant must
        name a session or an asset, and gets neither tokens nor URLs."""
        args = _own_assets_get.parse_args()
        participant = g.current_participant
        full_access = g.participant_full_access
        access = ParticipantAccess(participant)
        if not full_access and not args['id_session'] and not args['id_asset'] and not args['asset_uuid']:
            return gettext('Forbidden'), 403
        if args['id_session'] and args['id_session'] not in access.sessions_ids():
            return gettext('No access to session'), 403
        assets = access.assets(args['id_asset'], args['asset_uuid'], args['id_session'])
        return _assets_answer(self, assets, participant.participant_uuid, args['with_urls'] and full_access,
                              args['with_only_token'] and full_access, access.services() if full_access else [],
                              lambda asset: asset.to_json())


class DeviceQueryAssets(_DoubleResource):
    @auth.device_required
    def get(self):
        args = _own_assets_get.parse_args()
        device = g.current_device
        access = DeviceAccess(device)
        if args['id_session'] and args['id_session'] not in access.sessions_ids():
            return gettext('No access to session'), 403
        assets = access.assets(args['id_asset'], args['asset_uuid'], args['id_session'])
        return _assets_answer(self, assets, device.device_uuid, args['with_urls'], args['with_only_token'],
                              access.services(), lambda asset: asset.to_json())


# --- registration on the tests' namespaces ------------------------------------------------

def _register(namespace: Namespace, module, additional_args: dict | None, resources) -> None:
    kwargs = {'flaskModule': module}
    kwargs |= additional_args or {}
    for resource, url in resources:
        namespace.add_resource(resource, url, resource_class_kwargs=kwargs)


def register_service_api(module, namespace: Namespace, additional_args: dict | None = None) -> None:
    _register(namespace, module, additional_args, ((ServiceQueryAssets, '/assets'),
                                                   (ServiceQueryServices, '/services'),
                                                   (ServiceQuerySessions, '/sessions')))


def register_user_api(module, namespace: Namespace, additional_args: dict | None = None) -> None:
    _register(namespace, module, additional_args, ((UserQueryAssets, '/assets'),
                                                   (UserLogin, '/login'),
                                                   (UserLogout, '/logout'),
                                                   (UserQueryProjects, '/projects')))


def register_participant_api(module, namespace: Namespace, additional_args: dict | None = None) -> None:
    _register(namespace, module, additional_args, ((ParticipantQueryAssets, '/assets'),))


def register_device_api(module, namespace: Namespace, additional_args: dict | None = None) -> None:
    _register(namespace, module, additional_args, ((DeviceQueryAssets, '/assets'),))

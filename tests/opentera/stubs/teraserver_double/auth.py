"""How TeraServer authenticates the callers of its API (OpenTera's modules/LoginModule/LoginModule.py
with Flask-HTTPAuth), reimplemented for the double.

The keys are read from Redis at every request, as TeraServer does: FakeFileTransferService
writes them there (the user, participant and service keys are fixed strings; the device and
static participant keys come from the database's server settings).

TeraServer answers 401 (not 403) when authentication fails, and where Flask-HTTPAuth is in the
way (users and participants) the answer is its plain-text "Unauthorized" with a
WWW-Authenticate header; the double does the same.
"""
import datetime
from functools import wraps

import jwt
from flask import Response, g, request
from flask_babel import gettext
from flask_restx import reqparse
from opentera.db.models.TeraDevice import TeraDevice
from opentera.db.models.TeraParticipant import TeraParticipant
from opentera.db.models.TeraService import TeraService
from opentera.db.models.TeraUser import TeraUser
from opentera.redis.RedisVars import RedisVars

from ot_harness import settings

USER_DISABLED_TOKENS = 'user_disabled_tokens'
PARTICIPANT_DISABLED_TOKENS = 'participant_disabled_tokens'
MAX_LOGIN_ATTEMPTS = 5  # per user or participant, counted for 120 s, as TeraServer does

_token_parser = reqparse.RequestParser()
_token_parser.add_argument('token', type=str, required=False)


def _key(name: str) -> bytes | None:
    return settings.redis_client().get(name)


def _decode(token: str | None, key_name: str) -> dict | None:
    key = _key(key_name)
    if not token or key is None:
        return None
    try:
        return jwt.decode(token, key, algorithms='HS256', options={'verify_jti': False})
    except jwt.PyJWTError:
        return None


def _authorization() -> tuple[str, str] | None:
    """(scheme, credentials) of the Authorization header; None when absent. Raises ValueError
    when it is not `<scheme> <credentials>`."""
    header = request.headers.get('Authorization')
    if header is None:
        return None
    scheme, credentials = header.split(None, 1)
    return scheme, credentials


def _httpauth_error(scheme_header: str) -> Response:
    """Flask-HTTPAuth's answer when TeraServer's verify callback refuses (LoginModule.auth_error)."""
    response = Response(gettext('Unauthorized'), status=401, mimetype='text/html')
    response.headers['WWW-Authenticate'] = scheme_header
    return response


def _is_disabled(set_name: str, token: str) -> bool:
    # DisabledTokenStorage.is_disabled_token: an empty token counts as disabled.
    return not token or bool(settings.redis_client().sismember(set_name, token))


def _login_attempts_exceeded(key: str) -> bool:
    attempts = settings.redis_client().get(key)
    return attempts is not None and int(attempts) >= MAX_LOGIN_ATTEMPTS


def _count_failed_login(key: str) -> None:
    client = settings.redis_client()
    attempts = int(client.get(key) or 0) + 1
    client.set(key, attempts, ex=120)


# --- services ---------------------------------------------------------------------------

def service_token_required(f):
    """LoginModule.service_token_or_certificate_required: an `OpenTera` header (or a `token`
    argument when there is none) signed with the service key, naming an enabled service."""
    @wraps(f)
    def decorated(*args, **kwargs):
        service_uuid = None
        try:
            authorization = _authorization()
        except ValueError:
            return gettext('Invalid Token'), 401
        if authorization and authorization[0] == 'OpenTera':
            claims = _decode(authorization[1], RedisVars.RedisVar_ServiceTokenAPIKey)
            if claims is None:
                return gettext('Unauthorized'), 401
            service_uuid = claims.get('service_uuid')
        if not service_uuid:
            token = _token_parser.parse_args(strict=False)['token']
            if token:
                claims = _decode(token, RedisVars.RedisVar_ServiceTokenAPIKey)
                if claims is None:
                    return gettext('Unauthorized'), 401
                service_uuid = claims.get('service_uuid')
        if service_uuid:
            service = TeraService.get_service_by_uuid(service_uuid)
            if service and service.service_enabled:
                g.current_service = service
                return f(*args, **kwargs)
        return gettext('Unauthorized'), 401
    return decorated


# --- users ------------------------------------------------------------------------------

def _verify_user_password(username: str, password: str, is_login: bool):
    """LoginModule.user_verify_password. Returns the user, None, or a Response to send instead."""
    user = TeraUser.get_user_by_username(username) if username else None
    if not user:
        return None
    attempts_key = RedisVars.RedisVar_UserLoginAttemptKey + user.user_uuid
    if _login_attempts_exceeded(attempts_key):
        return None
    logged = TeraUser.verify_password(username=username, password=password, user=user)
    if logged and logged.is_active():
        if not is_login:
            # API access with a password is refused to users who must change it or use 2FA.
            if logged.user_force_password_change:
                return Response(gettext('Unauthorized - User must login first to change password'), status=401)
            if logged.user_2fa_enabled:
                return Response(gettext('Unauthorized - 2FA is enabled, must login first and use token'), status=401)
        logged.update_last_online()
        settings.redis_client().delete(attempts_key)
        return logged
    _count_failed_login(attempts_key)
    return None


def _verify_user_token(token: str):
    """LoginModule.user_verify_token: not revoked, signed with the user key, unexpired, an active user."""
    if _is_disabled(USER_DISABLED_TOKENS, token):
        return None
    claims = _decode(token, RedisVars.RedisVar_UserTokenAPIKey)
    if not claims or not claims.get('user_uuid') or not claims.get('exp'):
        return None
    if datetime.datetime.fromtimestamp(claims['exp']) < datetime.datetime.now():
        return None
    user = TeraUser.get_user_by_uuid(claims['user_uuid'])
    return user if user and user.is_active() else None


def _user_auth(f, *, login: bool):
    @wraps(f)
    def decorated(*args, **kwargs):
        # Flask-HTTPAuth's MultiAuth(basic, token): the token scheme when the header says
        # `OpenTera <token>`, Basic otherwise (which fails without Basic credentials).
        try:
            authorization = _authorization()
        except ValueError:
            authorization = None
        if not login and authorization and authorization[0].lower() == 'opentera':
            user = _verify_user_token(authorization[1])
            failure = 'OpenTera realm="Authentication Required"'
        else:
            credentials = request.authorization if request.authorization and request.authorization.type == 'basic' \
                else None
            user = _verify_user_password(credentials.username if credentials else '',
                                         credentials.password if credentials else '', is_login=login)
            failure = 'Basic realm="user"'
        if isinstance(user, Response):
            return user
        if user is None:
            return _httpauth_error(failure)
        g.current_user = user
        return f(*args, **kwargs)
    return decorated


def user_required(f):
    """`user_multi_auth.login_required`: HTTP Basic or a user token."""
    return _user_auth(f, login=False)


def user_login_required(f):
    """`user_http_login_auth.login_required`, for /api/user/login: HTTP Basic only."""
    return _user_auth(f, login=True)


# --- participants -----------------------------------------------------------------------

def _verify_participant_password(username: str, password: str):
    participant = TeraParticipant.get_participant_by_username(username) if username else None
    if not participant:
        return None
    attempts_key = RedisVars.RedisVar_ParticipantLoginAttemptKey + participant.participant_uuid
    if _login_attempts_exceeded(attempts_key):
        return None
    logged = TeraParticipant.verify_password(username=username, password=password, participant=participant)
    if logged and logged.is_active():
        settings.redis_client().delete(attempts_key)
        return participant
    _count_failed_login(attempts_key)
    return None


def _verify_participant_token(token: str):
    """LoginModule.participant_verify_token. Returns (participant, full_access) or None: the
    static token stored in the database gives limited access, a dynamic one full access."""
    participant = TeraParticipant.get_participant_by_token(token) if token else None
    if participant and participant.is_active():
        return participant, False
    if not token or _is_disabled(PARTICIPANT_DISABLED_TOKENS, token):
        return None
    claims = _decode(token, RedisVars.RedisVar_ParticipantTokenAPIKey)
    if not claims or not claims.get('participant_uuid') or not claims.get('exp'):
        return None
    if datetime.datetime.fromtimestamp(claims['exp']) < datetime.datetime.now():
        return None
    participant = TeraParticipant.get_participant_by_uuid(claims['participant_uuid'])
    return (participant, True) if participant and participant.is_active() else None


def participant_required(f):
    """`participant_multi_auth.login_required(role='limited')`: HTTP Basic or a participant
    token (static or dynamic); every successful login has the `limited` role. Sets
    g.current_participant and g.participant_full_access (TeraServer's `fullAccess` flag)."""
    @wraps(f)
    def decorated(*args, **kwargs):
        try:
            authorization = _authorization()
        except ValueError:
            authorization = None
        if authorization and authorization[0].lower() == 'opentera':
            found = _verify_participant_token(authorization[1])
            failure = 'OpenTera realm="Authentication Required"'
        else:
            credentials = request.authorization if request.authorization and request.authorization.type == 'basic' \
                else None
            participant = _verify_participant_password(credentials.username if credentials else '',
                                                       credentials.password if credentials else '')
            found = (participant, True) if participant else None
            failure = 'Basic realm="participant"'
        if found is None:
            return _httpauth_error(failure)
        g.current_participant, g.participant_full_access = found
        return f(*args, **kwargs)
    return decorated


# --- devices ----------------------------------------------------------------------------

def device_required(f):
    """LoginModule.device_token_or_certificate_required, without certificates: TeraServer takes
    a device's uuid from its TLS client certificate (X-Device-Uuid, which it strips from every
    other request); the double has no TLS, so only the device's token (header or `token`
    argument) identifies it."""
    @wraps(f)
    def decorated(*args, **kwargs):
        try:
            authorization = _authorization()
        except ValueError:
            return gettext('Invalid token'), 401
        if authorization and authorization[0] == 'OpenTera':
            device = TeraDevice.get_device_by_token(authorization[1])
            if device:
                if not device.device_enabled:
                    return gettext('Disabled device'), 401
                g.current_device = device
                return f(*args, **kwargs)
        token = _token_parser.parse_args(strict=False)['token']
        if token:
            device = TeraDevice.get_device_by_token(token)
            if device and device.device_enabled:
                g.current_device = device
                return f(*args, **kwargs)
        return gettext('Unauthorized'), 401
    return decorated


def add_disabled_user_token(token: str) -> None:
    """TeraServer's logout: the token joins the Redis set every service checks."""
    settings.redis_client().sadd(USER_DISABLED_TOKENS, token)

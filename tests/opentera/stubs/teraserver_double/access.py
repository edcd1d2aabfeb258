"""What a service, user, participant or device may see, by TeraServer's rules (OpenTera's
modules/DatabaseModule/DBManagerTera{Service,User,Participant,Device}Access.py), for the
queries the double answers. Only the rules those queries need are here."""
from sqlalchemy import or_

from opentera.db.models.TeraAsset import TeraAsset
from opentera.db.models.TeraDevice import TeraDevice
from opentera.db.models.TeraDeviceProject import TeraDeviceProject
from opentera.db.models.TeraDeviceSite import TeraDeviceSite
from opentera.db.models.TeraParticipant import TeraParticipant
from opentera.db.models.TeraProject import TeraProject
from opentera.db.models.TeraService import TeraService
from opentera.db.models.TeraServiceProject import TeraServiceProject
from opentera.db.models.TeraServiceSite import TeraServiceSite
from opentera.db.models.TeraSession import TeraSession
from opentera.db.models.TeraSessionType import TeraSessionType
from opentera.db.models.TeraSite import TeraSite
from opentera.db.models.TeraUser import TeraUser


class ServiceAccess:
    def __init__(self, service: TeraService):
        self.service = service

    def projects_ids(self) -> list[int]:
        return [sp.id_project for sp in TeraServiceProject.get_projects_for_service(self.service.id_service)]

    def session_types_ids(self) -> list[int]:
        # The session types the service runs, or is a secondary service of.
        query = TeraSessionType.query.join(TeraSessionType.session_type_secondary_services, isouter=True) \
            .filter(or_(TeraSessionType.id_service == self.service.id_service,
                        TeraService.id_service == self.service.id_service))
        return [st.id_session_type for st in query.all()]

    def sessions_ids(self) -> list[int]:
        # Since 2024-11, a service sees the sessions it created and those of its session types.
        query = TeraSession.query.filter(or_(TeraSession.id_creator_service == self.service.id_service,
                                             TeraSession.id_session_type.in_(self.session_types_ids())))
        return [session.id_session for session in query.all()]

    def participants_ids(self) -> list[int]:
        return [p.id_participant for p in TeraParticipant.query.filter(TeraParticipant.id_project.in_(self.projects_ids()))]

    def devices_ids(self) -> list[int]:
        query = TeraDevice.query.join(TeraDeviceProject).filter(TeraDeviceProject.id_project.in_(self.projects_ids()))
        return [device.id_device for device in query.all()]

    def users_ids(self) -> list[int]:
        users = set()
        for id_project in self.projects_ids():
            project = TeraProject.get_project_by_id(id_project)
            users.update(u.id_user for u in project.get_users_in_project(include_superadmins=True,
                                                                          include_site_access=True))
        return list(users)

    def query_asset(self, id_asset: int) -> list[TeraAsset]:
        return TeraAsset.query.filter(TeraAsset.id_session.in_(self.sessions_ids())) \
            .filter(TeraAsset.id_asset == id_asset).all()


class UserAccess:
    def __init__(self, user: TeraUser):
        self.user = user

    def projects(self) -> list[TeraProject]:
        if self.user.user_superadmin:
            return TeraProject.query.all()
        return list(self.user.get_projects_roles().keys())

    def projects_ids(self) -> list[int]:
        return [project.id_project for project in self.projects()]

    def project_role(self, id_project: int) -> str | None:
        roles = [role for project, role in self.user.get_projects_roles().items() if project.id_project == id_project]
        return roles[0]['project_role'] if len(roles) == 1 else None

    def sites_ids(self, admin_only=False) -> list[int]:
        if self.user.user_superadmin:
            return [site.id_site for site in TeraSite.query.all()]
        return [site.id_site for site, role in self.user.get_sites_roles().items()
                if not admin_only or role['site_role'] == 'admin']

    def services(self) -> list[TeraService]:
        if self.user.user_superadmin:
            return TeraService.query.all()
        # The services of the user's projects, and of the sites they administer.
        query = TeraService.query.outerjoin(TeraServiceProject).outerjoin(TeraServiceSite).filter(or_(
            TeraServiceProject.id_project.in_(self.projects_ids()),
            TeraServiceSite.id_site.in_(self.sites_ids(admin_only=True)))).group_by(TeraService.id_service)
        return query.all()

    def participants_ids(self) -> list[int]:
        return [p.id_participant for p in TeraParticipant.query.filter(TeraParticipant.id_project.in_(self.projects_ids()))]

    def devices_ids(self) -> list[int]:
        if self.user.user_superadmin:
            return [device.id_device for device in TeraDevice.query.all()]
        query = TeraDevice.query.join(TeraDeviceSite).filter(TeraDeviceSite.id_site.in_(self.sites_ids()))
        return [device.id_device for device in query.all()]

    def users_ids(self) -> list[int]:
        if self.user.user_superadmin:
            return [user.id_user for user in TeraUser.query.all()]
        users = {self.user.id_user}  # always visible to oneself
        for project in self.projects():
            users.update(u.id_user for u in project.get_users_in_project())
        return list(users)

    def services_ids(self) -> list[int]:
        return [service.id_service for service in self.services()]

    def query_session(self, id_session: int) -> TeraSession | None:
        session = TeraSession.get_session_by_id(id_session)
        if not session:
            return None
        if session.id_creator_user == self.user.id_user or session.has_user(self.user.id_user):
            return session
        if session.get_associated_project_id() in self.projects_ids():
            return session
        return None

    def query_asset(self, id_asset: int = None, asset_uuid: str = None) -> list[TeraAsset] | None:
        asset = TeraAsset.get_asset_by_id(id_asset) if id_asset else TeraAsset.get_asset_by_uuid(asset_uuid)
        # TeraServer fails with a 500 on an unknown asset (it reads the session of None); the
        # double answers as for an inaccessible one.
        if asset is None or not self.query_session(asset.id_session):
            return None
        if asset.asset_service_uuid not in [service.service_uuid for service in self.services()]:
            return None
        return [asset]


class ParticipantAccess:
    def __init__(self, participant: TeraParticipant):
        self.participant = participant

    def sessions_ids(self) -> list[int]:
        return [s.id_session for s in TeraSession.query.filter(
            TeraSession.id_creator_participant == self.participant.id_participant)]

    def assets(self, id_asset=None, asset_uuid=None, id_session=None) -> list[TeraAsset]:
        # Only the assets that name the participant (id_participant), whoever made the session.
        query = TeraAsset.query.filter(TeraAsset.id_participant == self.participant.id_participant)
        return _narrow(query, id_asset, asset_uuid, id_session).all()

    def services(self) -> list[TeraService]:
        return [sp.service_project_service
                for sp in TeraServiceProject.get_services_for_project(id_project=self.participant.id_project)]


class DeviceAccess:
    def __init__(self, device: TeraDevice):
        self.device = device

    def sessions_ids(self) -> list[int]:
        return [s.id_session for s in TeraSession.query.filter(TeraSession.id_creator_device == self.device.id_device)]

    def assets(self, id_asset=None, asset_uuid=None, id_session=None) -> list[TeraAsset]:
        query = TeraAsset.query.filter(TeraAsset.id_device == self.device.id_device)
        return _narrow(query, id_asset, asset_uuid, id_session).all()

    def services(self) -> list[TeraService]:
        projects_ids = [project.id_project for project in self.device.device_projects]
        return TeraService.query.join(TeraServiceProject).filter(
            TeraServiceProject.id_project.in_(projects_ids)).group_by(TeraService.id_service).all()


def _narrow(query, id_asset, asset_uuid, id_session):
    # One filter at most, in this order of precedence (as TeraServer).
    if id_asset:
        return query.filter(TeraAsset.id_asset == id_asset)
    if asset_uuid:
        return query.filter(TeraAsset.asset_uuid == asset_uuid)
    if id_session:
        return query.filter(TeraAsset.id_session == id_session)
    return query


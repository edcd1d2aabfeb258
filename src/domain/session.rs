//! The session aggregate (`session-<id_session>` streams): a registry entry saying who
//! may reach a session's assets. Registered and updated by services, deleted with all
//! its assets.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::names::SessionId;
use super::principal::{Principal, PrincipalKind};
use super::{domain_events, DomainError};

/// Everything a session registration says; the full state after each event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SessionDetails {
    pub id_session: SessionId,
    pub session_uuid: Uuid,
    /// Trimmed, without control characters.
    #[schemars(length(min = 1, max = MAX_SESSION_NAME_CHARS), regex(pattern = r"^[^\s\u0000-\u001F\u007F-\u009F\uFEFF]([^\u0000-\u001F\u007F-\u009F\uFEFF]*[^\s\u0000-\u001F\u007F-\u009F\uFEFF])?$"))]
    pub session_name: String,
    pub id_creator_uuid: Option<Uuid>,
    #[schemars(length(max = MAX_SESSION_MEMBERS))]
    pub session_users: Vec<Uuid>,
    #[schemars(length(max = MAX_SESSION_MEMBERS))]
    pub session_participants: Vec<Uuid>,
    #[schemars(length(max = MAX_SESSION_MEMBERS))]
    pub session_devices: Vec<Uuid>,
}

impl SessionDetails {
    /// The access rule of DESIGN.md: services, superadmins, the creator and the listed
    /// members (by their own kind) may act on the session's assets.
    pub fn grants(&self, principal: &Principal) -> bool {
        if principal.is_privileged() || self.id_creator_uuid == Some(principal.uuid) {
            return true;
        }
        let members = match principal.kind {
            PrincipalKind::User => &self.session_users,
            PrincipalKind::Participant => &self.session_participants,
            PrincipalKind::Device => &self.session_devices,
            PrincipalKind::Service => return true,
        };
        members.contains(&principal.uuid)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SessionDeleted {
    pub id_session: SessionId,
    pub session_uuid: Uuid,
}

domain_events!(SessionEvent {
    SessionRegistered(SessionDetails),
    SessionUpdated(SessionDetails),
    SessionDeleted(SessionDeleted),
});

/// A session's state folded from its stream. A deleted session can be registered again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Session {
    pub current: Option<SessionDetails>,
}

/// What a `PUT /sessions/{id}` or `session.upsert` command asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct UpsertSession {
    pub id_session: SessionId,
    pub session_name: String,
    pub session_uuid: Option<Uuid>,
    pub id_creator_uuid: Option<Uuid>,
    pub session_users: Vec<Uuid>,
    pub session_participants: Vec<Uuid>,
    pub session_devices: Vec<Uuid>,
}

pub const MAX_SESSION_NAME_CHARS: usize = 255;
pub const MAX_SESSION_MEMBERS: usize = 10_000;

/// What may be asked of a session.
#[derive(Debug, Clone)]
pub enum SessionCommand {
    /// Register or update; `new_uuid` names a session registered without a uuid.
    Upsert {
        command: UpsertSession,
        new_uuid: Uuid,
    },
    Delete,
}

impl Session {
    /// [`crate::domain::Aggregate::handle`].
    pub fn decide(&self, command: SessionCommand) -> Result<Vec<SessionEvent>, DomainError> {
        match command {
            SessionCommand::Upsert { command, new_uuid } => self.handle_upsert(command, new_uuid),
            SessionCommand::Delete => self.handle_delete(),
        }
    }

    pub fn apply(&mut self, event: &SessionEvent) {
        match event {
            SessionEvent::SessionRegistered(details) | SessionEvent::SessionUpdated(details) => {
                self.current = Some(details.clone())
            }
            SessionEvent::SessionDeleted(_) => self.current = None,
        }
    }

    /// Register or update. `new_uuid` is used when neither the command nor the current
    /// state names a session uuid. Returns no event when nothing would change.
    pub fn handle_upsert(&self, command: UpsertSession, new_uuid: Uuid) -> Result<Vec<SessionEvent>, DomainError> {
        let name = command.session_name.trim();
        if name.is_empty()
            || name.chars().count() > MAX_SESSION_NAME_CHARS
            || name.chars().any(super::names::is_forbidden_char)
        {
            return Err(DomainError::Invalid(format!(
                "session_name: must be 1 to {MAX_SESSION_NAME_CHARS} characters without control characters"
            )));
        }
        let member_count =
            command.session_users.len() + command.session_participants.len() + command.session_devices.len();
        if member_count > MAX_SESSION_MEMBERS {
            return Err(DomainError::Invalid(format!("at most {MAX_SESSION_MEMBERS} members per session")));
        }
        let session_uuid = command.session_uuid.or(self.current.as_ref().map(|c| c.session_uuid)).unwrap_or(new_uuid);
        let details = SessionDetails {
            id_session: command.id_session,
            session_uuid,
            session_name: name.to_owned(),
            id_creator_uuid: command.id_creator_uuid.or(self.current.as_ref().and_then(|c| c.id_creator_uuid)),
            session_users: dedup(command.session_users),
            session_participants: dedup(command.session_participants),
            session_devices: dedup(command.session_devices),
        };
        Ok(match &self.current {
            None => vec![SessionEvent::SessionRegistered(details)],
            Some(current) if *current == details => vec![],
            Some(_) => vec![SessionEvent::SessionUpdated(details)],
        })
    }

    pub fn handle_delete(&self) -> Result<Vec<SessionEvent>, DomainError> {
        let current = self.current.as_ref().ok_or(DomainError::NotFound("session"))?;
        Ok(vec![SessionEvent::SessionDeleted(SessionDeleted {
            id_session: current.id_session,
            session_uuid: current.session_uuid,
        })])
    }
}

fn dedup(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The schema of the published `SessionRegistered` takes exactly the names the
        /// rules let through, as stored (trimmed).
        #[test]
        fn session_name_schema_matches_the_rules(name in "[a \t\x00\x7f\u{85}\u{a0}\u{feff}é]{0,6}|a{250,260}") {
            let schema = schemars::SchemaGenerator::default().into_root_schema_for::<SessionDetails>();
            let validator = jsonschema::validator_for(schema.as_value()).unwrap();
            let details = |session_name: &str| {
                let details = SessionDetails {
                    id_session: SessionId::new(7).unwrap(),
                    session_uuid: Uuid::nil(),
                    session_name: session_name.to_owned(),
                    id_creator_uuid: None,
                    session_users: vec![],
                    session_participants: vec![],
                    session_devices: vec![],
                };
                serde_json::to_value(details).unwrap()
            };
            match Session::default().handle_upsert(upsert(&name), Uuid::nil()) {
                Ok(events) => {
                    let SessionEvent::SessionRegistered(stored) = &events[0] else { panic!("{events:?}") };
                    prop_assert!(validator.is_valid(&serde_json::to_value(stored).unwrap()));
                }
                Err(_) => prop_assert!(!validator.is_valid(&details(name.trim()))),
            }
        }
    }

    fn upsert(name: &str) -> UpsertSession {
        UpsertSession {
            id_session: SessionId::new(7).unwrap(),
            session_name: name.into(),
            session_uuid: None,
            id_creator_uuid: None,
            session_users: vec![],
            session_participants: vec![],
            session_devices: vec![],
        }
    }

    fn folded(events: &[SessionEvent]) -> Session {
        let mut session = Session::default();
        events.iter().for_each(|e| session.apply(e));
        session
    }

    #[test]
    fn first_upsert_registers_then_changes_update_and_repeats_do_nothing() {
        let uuid = Uuid::new_v4();
        let registered = Session::default().handle_upsert(upsert("visit"), uuid).unwrap();
        assert!(matches!(&registered[..], [SessionEvent::SessionRegistered(d)] if d.session_uuid == uuid));
        let session = folded(&registered);
        assert_eq!(session.handle_upsert(upsert("visit"), Uuid::new_v4()).unwrap(), vec![]);
        let updated = session.handle_upsert(upsert("renamed"), Uuid::new_v4()).unwrap();
        assert!(
            matches!(&updated[..], [SessionEvent::SessionUpdated(d)] if d.session_uuid == uuid && d.session_name == "renamed")
        );
    }

    #[test]
    fn delete_needs_a_registered_session() {
        assert_eq!(Session::default().handle_delete(), Err(DomainError::NotFound("session")));
        let session = folded(&Session::default().handle_upsert(upsert("v"), Uuid::new_v4()).unwrap());
        let deleted = session.handle_delete().unwrap();
        assert!(folded(&deleted).current.is_none());
    }

    #[test]
    fn blank_names_are_refused() {
        assert!(matches!(Session::default().handle_upsert(upsert("  "), Uuid::new_v4()), Err(DomainError::Invalid(_))));
    }

    #[test]
    fn members_creator_and_privileged_principals_have_access() {
        let user = Uuid::new_v4();
        let creator = Uuid::new_v4();
        let mut command = upsert("v");
        command.session_users = vec![user];
        command.id_creator_uuid = Some(creator);
        let details = match &Session::default().handle_upsert(command, Uuid::new_v4()).unwrap()[0] {
            SessionEvent::SessionRegistered(d) => d.clone(),
            other => panic!("unexpected {other:?}"),
        };
        let principal = |kind, uuid, superadmin| Principal { kind, uuid, name: String::new(), superadmin };
        assert!(details.grants(&principal(PrincipalKind::User, user, false)));
        assert!(!details.grants(&principal(PrincipalKind::Participant, user, false)), "membership is per kind");
        assert!(details.grants(&principal(PrincipalKind::Device, creator, false)));
        assert!(!details.grants(&principal(PrincipalKind::User, Uuid::new_v4(), false)));
        assert!(details.grants(&principal(PrincipalKind::User, Uuid::new_v4(), true)));
        assert!(details.grants(&principal(PrincipalKind::Service, Uuid::new_v4(), false)));
    }

    #[test]
    fn events_round_trip_through_json() {
        use crate::domain::DomainEvent;
        let events = Session::default().handle_upsert(upsert("v"), Uuid::new_v4()).unwrap();
        for event in events {
            let back = SessionEvent::from_parts(event.event_type(), &event.to_data()).unwrap().unwrap();
            assert_eq!(back, event);
        }
    }
}

//! What the HTTP and AMQP edges share about sessions: the body that registers one
//! (`PUT /sessions/{id_session}`, `session.upsert`) and the answer to deleting one.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::names::SessionId;
use crate::domain::session::UpsertSession;
use crate::http::fields;

/// The body of `PUT /sessions/{id_session}`.
#[derive(Debug, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionBody {
    /// 1 to 255 characters once trimmed, no control characters (blanks around are trimmed).
    #[schema(value_type = fields::SessionName)]
    #[schemars(regex(pattern = fields::session_name_pattern()))]
    pub session_name: String,
    #[schema(value_type = Option<fields::UuidText>)]
    pub session_uuid: Option<Uuid>,
    #[schema(value_type = Option<fields::UuidText>)]
    pub id_creator_uuid: Option<Uuid>,
    /// Members: at most 10,000 in the three lists together.
    #[serde(default)]
    #[schema(value_type = fields::Members)]
    #[schemars(length(max = crate::domain::session::MAX_SESSION_MEMBERS))]
    pub session_users: Vec<Uuid>,
    #[serde(default)]
    #[schema(value_type = fields::Members)]
    #[schemars(length(max = crate::domain::session::MAX_SESSION_MEMBERS))]
    pub session_participants: Vec<Uuid>,
    #[serde(default)]
    #[schema(value_type = fields::Members)]
    #[schemars(length(max = crate::domain::session::MAX_SESSION_MEMBERS))]
    pub session_devices: Vec<Uuid>,
}

impl SessionBody {
    /// The upsert command this body asks for (HTTP `PUT` and the AMQP `session.upsert`).
    pub fn into_command(self, id_session: SessionId) -> UpsertSession {
        UpsertSession {
            id_session,
            session_name: self.session_name,
            session_uuid: self.session_uuid,
            id_creator_uuid: self.id_creator_uuid,
            session_users: self.session_users,
            session_participants: self.session_participants,
            session_devices: self.session_devices,
        }
    }
}

/// The answer to deleting a session: it is deleted; its assets are deleted in batches
/// by this job (`purge_session`).
#[derive(Debug, Serialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct SessionDeletedReply {
    pub id_session: i64,
    /// The job that deletes the session's assets.
    pub job_uuid: Uuid,
}

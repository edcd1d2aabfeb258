//! Who is acting: the authenticated principal of a request or command, and the
//! `{kind, uuid}` actor recorded in event metadata and as an asset's creator.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The kinds of principal OpenTera knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    User,
    Participant,
    Device,
    Service,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Participant => "participant",
            Self::Device => "device",
            Self::Service => "service",
        }
    }
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "user" => Some(Self::User),
            "participant" => Some(Self::Participant),
            "device" => Some(Self::Device),
            "service" => Some(Self::Service),
            _ => None,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: PrincipalKind,
    pub uuid: Uuid,
    pub name: String,
    pub superadmin: bool,
}

impl Principal {
    pub fn actor(&self) -> Actor {
        Actor { kind: self.kind, uuid: self.uuid }
    }
    pub fn is_service(&self) -> bool {
        self.kind == PrincipalKind::Service
    }
    /// Services and superadmins may act on any session.
    pub fn is_privileged(&self) -> bool {
        self.is_service() || self.superadmin
    }
}

/// Who did something, as recorded in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct Actor {
    pub kind: PrincipalKind,
    pub uuid: Uuid,
}

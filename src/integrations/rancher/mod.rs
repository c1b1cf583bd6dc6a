//! The Rancher integration. (Being written.)

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::mpsc;

use super::*;
use crate::secrets::Secret;

pub const TYPE: &str = "rancher";

pub struct RancherConfig;

impl RancherConfig {
    pub fn from_value(_v: &Value) -> Result<RancherConfig, IntegrationError> {
        Ok(RancherConfig)
    }
}

pub struct Rancher;

impl Rancher {
    pub fn new(_spec: &IntegrationSpec, _secret: &Secret) -> Result<Rancher, IntegrationError> {
        Ok(Rancher)
    }
}

fn todo_err() -> IntegrationError {
    IntegrationError::Protocol {
        message: "not yet".into(),
    }
}

#[async_trait]
impl Integration for Rancher {
    async fn validate(&self) -> Result<ValidateResult, IntegrationError> {
        Err(todo_err())
    }
    async fn discover(&self, _sink: mpsc::Sender<DiscoveredObject>) -> Result<DiscoverySummary, IntegrationError> {
        Err(todo_err())
    }
    async fn grant(&self, _r: &GrantRequest) -> Result<GrantResult, IntegrationError> {
        Err(todo_err())
    }
    async fn revoke(&self, _r: &RevokeRequest) -> Result<RevokeResult, IntegrationError> {
        Err(todo_err())
    }
    async fn rotate_credentials(&self, _r: &RotateRequest) -> Result<GrantResult, IntegrationError> {
        Err(todo_err())
    }
    async fn delete_user(&self, _r: &DeleteUserRequest) -> Result<DeleteUserResult, IntegrationError> {
        Err(todo_err())
    }
}

//! The sweep: removes the connector's own bindings whose marked expiry has passed and that no
//! access still holds, so access ends even when the control plane's state is lost.

use super::Rancher;
use crate::integrations::{IntegrationError, SweepRequest, SweepResult};

impl Rancher {
    pub(super) async fn sweep_expired(&self, request: &SweepRequest) -> Result<SweepResult, IntegrationError> {
        let _ = request;
        Err(IntegrationError::Invalid {
            message: "sweep is not implemented yet".into(),
        })
    }
}

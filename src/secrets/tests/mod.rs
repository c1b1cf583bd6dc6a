//! Tests of the secret stores. Real servers where one runs here (moto for AWS, OpenBao for Vault),
//! wire-level fakes otherwise (Kubernetes API, Azure Key Vault, GCP Secret Manager).

mod registry;
mod support;

#[cfg(feature = "store-aws")]
mod aws_moto;
#[cfg(feature = "store-aws")]
mod aws_profiles;
#[cfg(feature = "store-azure")]
mod azure_fake;
#[cfg(all(
    feature = "store-aws",
    feature = "store-azure",
    feature = "store-gcp",
    feature = "store-kubernetes",
    feature = "store-vault"
))]
mod canary;
#[cfg(all(feature = "store-aws", feature = "store-vault"))]
mod env_default;
#[cfg(feature = "store-gcp")]
mod gcp_fake;
#[cfg(feature = "store-kubernetes")]
mod kube_fake;
#[cfg(feature = "store-vault")]
mod vault_auth;
#[cfg(feature = "store-vault")]
mod vault_bao;
#[cfg(feature = "store-vault")]
mod vault_config;
#[cfg(feature = "store-vault")]
mod vault_robust;

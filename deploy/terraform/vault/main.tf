# A HashiCorp Vault (or OpenBao) KV v2 entry with the Rancher API key, a policy that reads it and
# nothing else, and a login for the agent that it renews by itself: AppRole (anywhere) or
# Kubernetes auth (the agent in a cluster, with its service account token).
#
# The output hashicorp_vault_config is the value of HASHICORP_VAULT_CONFIG (a JSON list of one
# vault definition), or the content of the file named by HASHICORP_VAULT_CONFIG_FILE_PATH (the
# chart's hashicorpVault.config / hashicorpVault.existingSecret). The agent logs in with it, renews
# its token before the token's TTL ends, and logs in again when token_max_ttl is reached: no token
# to hand over that silently dies.

terraform {
  required_version = ">= 1.3"
  required_providers {
    vault = {
      source  = "hashicorp/vault"
      version = "~> 4.0"
    }
  }
}

variable "vault_address" {
  type        = string
  description = "Address the agent reaches Vault at, e.g. https://vault.example.com:8200."
}

variable "vault_namespace" {
  type        = string
  default     = null
  description = "Vault Enterprise / HCP namespace (e.g. \"admin\"). Null: none."
}

variable "mount" {
  type    = string
  default = "secret"
}

variable "path" {
  type    = string
  default = "apono/rancher-api-key"
}

variable "auth_method" {
  type        = string
  default     = "approle"
  description = "How the agent logs in: \"approle\" or \"kubernetes\"."
  validation {
    condition     = contains(["approle", "kubernetes"], var.auth_method)
    error_message = "auth_method must be \"approle\" or \"kubernetes\" (both are renewed by the agent)."
  }
}

variable "approle_mount" {
  type    = string
  default = "approle"
}

variable "enable_approle_mount" {
  type        = bool
  default     = true
  description = "Enable AppRole at approle_mount. Set false when it is already enabled there."
}

variable "kubernetes_mount" {
  type        = string
  default     = "kubernetes"
  description = "Path of a Kubernetes auth method that is already enabled and configured for the agent's cluster."
}

variable "agent_service_account" {
  type        = string
  default     = "apono-connector-service-account"
  description = "Kubernetes auth: the agent's ServiceAccount (the chart's serviceAccount.name; this is its default)."
}

variable "agent_namespace" {
  type        = string
  default     = "apono-connector"
  description = "Kubernetes auth: the agent's namespace."
}

variable "rancher_access_key" {
  type      = string
  sensitive = true
}

variable "rancher_secret_key" {
  type      = string
  sensitive = true
}

provider "vault" {
  address   = var.vault_address
  namespace = var.vault_namespace
}

resource "vault_kv_secret_v2" "rancher_api_key" {
  mount = var.mount
  name  = var.path
  data_json = jsonencode({
    access_key = var.rancher_access_key
    secret_key = var.rancher_secret_key
  })
}

resource "vault_policy" "apono_connector" {
  name = "apono-connector-read"
  # The KV v2 read, and the mount's KV version (the agent asks it once; without it the agent
  # tries v2 then v1). Renewing its own token is in Vault's default policy, which logins keep.
  policy = <<-EOT
    path "${var.mount}/data/${var.path}" {
      capabilities = ["read"]
    }
    path "sys/internal/ui/mounts/${var.mount}" {
      capabilities = ["read"]
    }
  EOT
}

locals {
  # Service tokens (batch tokens cannot be renewed), renewed by the agent at 2/3 of their TTL,
  # replaced by a new login at token_max_ttl.
  token_ttl     = 3600
  token_max_ttl = 86400
}

resource "vault_auth_backend" "approle" {
  count = var.auth_method == "approle" && var.enable_approle_mount ? 1 : 0
  type  = "approle"
  path  = var.approle_mount
}

resource "vault_approle_auth_backend_role" "apono_connector" {
  count          = var.auth_method == "approle" ? 1 : 0
  backend        = var.enable_approle_mount ? vault_auth_backend.approle[0].path : var.approle_mount
  role_name      = "apono-connector"
  token_policies = [vault_policy.apono_connector.name]
  token_type     = "service"
  token_ttl      = local.token_ttl
  token_max_ttl  = local.token_max_ttl
  # The agent logs in again whenever a token reaches token_max_ttl, with the same secret_id:
  # a secret_id that expires or runs out of uses would stop it. Rotate it by replacing
  # vault_approle_auth_backend_role_secret_id.apono_connector (terraform apply -replace=...).
  secret_id_ttl      = 0
  secret_id_num_uses = 0
}

resource "vault_approle_auth_backend_role_secret_id" "apono_connector" {
  count     = var.auth_method == "approle" ? 1 : 0
  backend   = vault_approle_auth_backend_role.apono_connector[0].backend
  role_name = vault_approle_auth_backend_role.apono_connector[0].role_name
}

resource "vault_kubernetes_auth_backend_role" "apono_connector" {
  count                            = var.auth_method == "kubernetes" ? 1 : 0
  backend                          = var.kubernetes_mount
  role_name                        = "apono-connector"
  bound_service_account_names      = [var.agent_service_account]
  bound_service_account_namespaces = [var.agent_namespace]
  token_policies                   = [vault_policy.apono_connector.name]
  token_type                       = "service"
  token_ttl                        = local.token_ttl
  token_max_ttl                    = local.token_max_ttl
}

locals {
  # Both branches carry the same keys (null where unused) so Terraform sees one type; the output
  # drops the nulls.
  login = var.auth_method == "approle" ? {
    auth      = "approle"
    mount     = var.approle_mount
    role_id   = vault_approle_auth_backend_role.apono_connector[0].role_id
    secret_id = vault_approle_auth_backend_role_secret_id.apono_connector[0].secret_id
    role      = null
    } : {
    # The agent reads its service account token from the default path; the chart mounts it
    # when a definition uses Kubernetes auth.
    auth      = "kubernetes"
    mount     = var.kubernetes_mount
    role_id   = null
    secret_id = null
    role      = vault_kubernetes_auth_backend_role.apono_connector[0].role_name
  }
}

output "secret_store" {
  value = jsonencode({
    type          = "HASHICORP_VAULT"
    secret_engine = var.mount
    path          = var.path
  })
}

output "hashicorp_vault_config" {
  description = "HASHICORP_VAULT_CONFIG: a JSON list with one vault definition (holds the AppRole secret_id)."
  sensitive   = true
  value = jsonencode([
    { for k, v in merge({ address = var.vault_address, namespace = var.vault_namespace }, local.login) : k => v if v != null }
  ])
}

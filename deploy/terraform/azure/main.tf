# An Azure Key Vault secret with the Rancher API key, and read access to it for the agent's
# identity (managed identity or workload identity).
#
# The agent reads the secret's value (RBAC data action
# Microsoft.KeyVault/vaults/secrets/getSecret/action; access policy "Get"). With
# require_read_mark = true (set it when the agent runs with APONO_REQUIRE_READ_MARK=AZURE), the
# secret is tagged apono-connector-read=true and the agent also lists the secret's versions to find
# the tag (data action Microsoft.KeyVault/vaults/secrets/readMetadata/action, which "Key Vault
# Secrets User" already holds; access policy "List").
#
# azurerm 4.x needs the subscription: set subscription_id, or ARM_SUBSCRIPTION_ID in the
# environment.

terraform {
  required_version = ">= 1.3"
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.0"
    }
  }
}

variable "subscription_id" {
  type        = string
  default     = null
  description = "Subscription of the Key Vault. Null: ARM_SUBSCRIPTION_ID from the environment."
}

variable "key_vault_name" {
  type = string
}

variable "key_vault_resource_group_name" {
  type = string
}

variable "permission_model" {
  type        = string
  default     = "rbac"
  description = "The vault's permission model: \"rbac\" (Azure role-based access control) or \"access_policy\"."
  validation {
    condition     = contains(["rbac", "access_policy"], var.permission_model)
    error_message = "permission_model must be \"rbac\" or \"access_policy\" (see the vault's Access configuration)."
  }
}

variable "agent_principal_id" {
  type        = string
  description = "Object (principal) id of the identity the agent runs as."
}

variable "require_read_mark" {
  type        = bool
  default     = false
  description = "Tag the secret and let the agent list its versions: for an agent run with APONO_REQUIRE_READ_MARK=AZURE."
}

variable "secret_name" {
  type    = string
  default = "rancher-api-key"
}

variable "rancher_access_key" {
  type      = string
  sensitive = true
}

variable "rancher_secret_key" {
  type      = string
  sensitive = true
}

provider "azurerm" {
  features {}
  subscription_id = var.subscription_id
}

data "azurerm_key_vault" "vault" {
  name                = var.key_vault_name
  resource_group_name = var.key_vault_resource_group_name
}

resource "azurerm_key_vault_secret" "rancher_api_key" {
  name         = var.secret_name
  key_vault_id = data.azurerm_key_vault.vault.id
  value = jsonencode({
    access_key = var.rancher_access_key
    secret_key = var.rancher_secret_key
  })
  content_type = "application/json"
  # The tag matters only to an agent that requires it (APONO_REQUIRE_READ_MARK=AZURE).
  tags = var.require_read_mark ? { "apono-connector-read" = "true" } : {}
}

# RBAC vaults: "Key Vault Secrets User" (getSecret + readMetadata) on this secret only.
resource "azurerm_role_assignment" "agent_reads" {
  count                = var.permission_model == "rbac" ? 1 : 0
  scope                = azurerm_key_vault_secret.rancher_api_key.resource_versionless_id
  role_definition_name = "Key Vault Secrets User"
  principal_id         = var.agent_principal_id
}

# Access-policy vaults: a policy applies to every secret in the vault; Azure has no narrower
# grant in that model (prefer RBAC to confine the agent to this secret).
resource "azurerm_key_vault_access_policy" "agent_reads" {
  count              = var.permission_model == "access_policy" ? 1 : 0
  key_vault_id       = data.azurerm_key_vault.vault.id
  tenant_id          = data.azurerm_key_vault.vault.tenant_id
  object_id          = var.agent_principal_id
  secret_permissions = var.require_read_mark ? ["Get", "List"] : ["Get"]
}

output "secret_store" {
  value = jsonencode({
    type      = "AZURE"
    vault_url = data.azurerm_key_vault.vault.vault_uri
    name      = azurerm_key_vault_secret.rancher_api_key.name
  })
}

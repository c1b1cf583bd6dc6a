# An Azure Key Vault secret with the Rancher API key, tagged for the agent.

terraform {
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.0"
    }
  }
}

variable "key_vault_name" {
  type = string
}

variable "key_vault_resource_group_name" {
  type = string
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
  # The agent reads only secrets carrying this tag.
  tags = {
    "apono-connector-read" = "true"
  }
}

output "secret_store" {
  value = jsonencode({
    type      = "AZURE"
    vault_url = data.azurerm_key_vault.vault.vault_uri
    name      = azurerm_key_vault_secret.rancher_api_key.name
  })
}

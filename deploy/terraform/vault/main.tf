# A HashiCorp Vault (or OpenBao) KV v2 entry with the Rancher API key, and a policy and token
# that can read it and nothing else. Give the token to the agent in HASHICORP_VAULT_CONFIG.

terraform {
  required_providers {
    vault = {
      source  = "hashicorp/vault"
      version = "~> 4.0"
    }
  }
}

variable "mount" {
  type    = string
  default = "secret"
}

variable "path" {
  type    = string
  default = "apono/rancher-api-key"
}

variable "rancher_access_key" {
  type      = string
  sensitive = true
}

variable "rancher_secret_key" {
  type      = string
  sensitive = true
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
  name   = "apono-connector-read"
  policy = <<-EOT
    path "${var.mount}/data/${var.path}" {
      capabilities = ["read"]
    }
    path "sys/internal/ui/mounts/${var.mount}" {
      capabilities = ["read"]
    }
  EOT
}

resource "vault_token" "apono_connector" {
  policies  = [vault_policy.apono_connector.name]
  renewable = true
  ttl       = "720h"
}

output "secret_store" {
  value = jsonencode({
    type          = "HASHICORP_VAULT"
    secret_engine = var.mount
    path          = var.path
  })
}

output "hashicorp_vault_config_entry" {
  sensitive = true
  value = jsonencode({
    address = "VAULT_ADDRESS"
    token   = vault_token.apono_connector.client_token
  })
}

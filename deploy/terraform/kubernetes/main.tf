# The agent installed with Helm, and a Kubernetes Secret with the Rancher API key, labelled for
# the agent, that the agent is allowed to read.
#
# The agent talks to the control plane at apono_url, or, with control_plane_in_cluster = true, to
# one the chart runs in the cluster (controlPlane.enabled: `apono-connector control-plane serve`).
# There is no default address: nothing leaves the cluster unless you say where to.

terraform {
  required_version = ">= 1.3"
  required_providers {
    # The seed pins kubernetes 2.32.0 and helm 2.15.0; these ranges include them. Helm provider
    # 3.x writes `set = [...]` instead of `set {}` blocks, so it stays out.
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.32"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 2.15"
    }
  }
}

variable "kubeconfig" {
  type    = string
  default = "~/.kube/config"
}

variable "namespace" {
  type        = string
  default     = "apono-connector"
  description = "Namespace of the release, created when missing (an existing one is fine)."
}

variable "apono_url" {
  type        = string
  default     = null
  description = "Address of the control plane (APONO_URL). Required unless control_plane_in_cluster is true."
}

variable "allow_apono_host" {
  type        = bool
  default     = false
  description = "Allow an apono_url in Apono's own domain (chart value apono.allowAponoHost). Off: such an address, carried over from Apono's Terraform modules, is refused, since this agent would send its token there and never become ready."
}

variable "allowed_rancher_hosts" {
  type        = list(string)
  default     = []
  description = "Rancher hosts (host or host:port) the agent may send an integration's API key to (chart value allowedRancherHosts). Empty: the control plane decides."
}

variable "control_plane_in_cluster" {
  type        = bool
  default     = false
  description = "Run the control plane in the cluster too (chart value controlPlane.enabled) and point the agent at it."
}

variable "connector_id" {
  type = string
}

variable "apono_token" {
  type        = string
  default     = null
  sensitive   = true
  description = "The connector's token. Prefer apono_token_secret: a token given here is kept in the Terraform state."
}

variable "apono_token_secret" {
  type        = string
  default     = null
  description = "Name of an existing Secret in the namespace holding the token (chart value apono.existingSecret): the token stays out of the Terraform state."
}

variable "apono_token_secret_key" {
  type        = string
  default     = "APONO_TOKEN"
  description = "Key of the token in apono_token_secret."
}

variable "image_registry" {
  type        = string
  description = "Registry you pushed the image built from this repository's Dockerfile to."
}

variable "secret_name" {
  type    = string
  default = "rancher-api-key"
}

variable "other_allowed_secrets" {
  type        = list(string)
  default     = []
  description = "More Secrets the agent may read: a bare name is in the release namespace, namespace/name elsewhere."
}

variable "rancher_access_key" {
  type      = string
  sensitive = true
}

variable "rancher_secret_key" {
  type      = string
  sensitive = true
}

provider "kubernetes" {
  config_path = var.kubeconfig
}

provider "helm" {
  kubernetes {
    config_path = var.kubeconfig
  }
}

locals {
  apono_url_given = var.apono_url != null && var.apono_url != ""
  # A host in Apono's own domain (apono.io or below it), as the chart refuses it: what Apono's
  # modules set (api.apono.io) must not receive this agent's token.
  apono_url_is_apono = length(regexall("^([a-z][a-z0-9+.-]*://)?([^/@]*@)?([^/:@]*\\.)?apono\\.io\\.?(:[0-9]*)?(/.*)?$", lower(trimspace(var.apono_url == null ? "" : var.apono_url)))) > 0
  allowed_secrets    = concat([var.secret_name], var.other_allowed_secrets)
  # Helm's list syntax, {a,b,c}. Apono's docs write "{secret1\,secret2\,secret3}", which Terraform
  # refuses ("\," is not an HCL escape): the backslashes are for the shell, where they stop brace
  # expansion. Terraform hands the value to Helm with no shell in between, so plain commas are
  # right here. ("{a\\,b\\,c}" also works: Helm then reads one item holding commas, which the chart
  # splits.)
  allowed_secrets_value = "{${join(",", local.allowed_secrets)}}"
}

resource "helm_release" "apono_connector" {
  name             = "apono-connector"
  chart            = "${path.module}/../../helm/apono-connector"
  namespace        = var.namespace
  create_namespace = true

  lifecycle {
    precondition {
      condition     = local.apono_url_given != var.control_plane_in_cluster
      error_message = "Set apono_url to your control plane's address, or control_plane_in_cluster = true to run one in the cluster (not both)."
    }
    precondition {
      condition     = !local.apono_url_is_apono || var.allow_apono_host
      error_message = "apono_url is Apono's service (carried over from a module written for Apono's connector): this agent speaks its own protocol, would never become ready there, and would send its token to Apono on every retry. Point apono_url at the control plane you run, or set control_plane_in_cluster = true; set allow_apono_host = true only if that host really runs this project's control plane."
    }
    precondition {
      condition     = (var.apono_token != null) != (var.apono_token_secret != null)
      error_message = "Set apono_token_secret (an existing Secret holding the token) or apono_token (one of the two)."
    }
  }

  # set_sensitive keeps the token out of plans and logs, not out of the state: apono.existingSecret
  # (apono_token_secret) does.
  set_sensitive {
    name  = "apono.token"
    value = var.apono_token == null ? "" : var.apono_token
    type  = "string"
  }
  set {
    name  = "apono.existingSecret"
    value = var.apono_token_secret == null ? "" : var.apono_token_secret
    type  = "string"
  }
  set {
    name  = "apono.existingSecretKey"
    value = var.apono_token_secret_key
    type  = "string"
  }
  set {
    name  = "apono.connectorId"
    value = var.connector_id
    type  = "string"
  }
  set {
    name  = "apono.url"
    value = local.apono_url_given ? var.apono_url : ""
    type  = "string"
  }
  set {
    name  = "apono.allowAponoHost"
    value = tostring(var.allow_apono_host)
  }
  set {
    name  = "controlPlane.enabled"
    value = tostring(var.control_plane_in_cluster)
  }
  # Helm's list syntax again; empty: the chart's default (no limit, and a NOTES warning).
  set {
    name  = "allowedRancherHosts"
    value = length(var.allowed_rancher_hosts) == 0 ? "" : "{${join(",", var.allowed_rancher_hosts)}}"
    type  = "string"
  }
  set {
    name  = "image.registry"
    value = var.image_registry
    type  = "string"
  }
  # Apono's name for "let the agent read Kubernetes Secrets": the chart makes, in each namespace
  # that holds a listed Secret, a Role with `get` on those Secrets only (resourceNames), bound to
  # the agent's ServiceAccount. Nothing cluster-wide.
  set {
    name  = "serviceAccount.manageClusterRoles"
    value = "true"
  }
  set {
    name  = "allowedSecretsToRead"
    value = local.allowed_secrets_value
    type  = "string"
  }
}

resource "kubernetes_secret" "rancher_api_key" {
  metadata {
    name      = var.secret_name
    namespace = var.namespace
    labels = {
      # The agent reads only Secrets carrying this label.
      "apono-connector-read" = "true"
    }
  }
  data = {
    access_key = var.rancher_access_key
    secret_key = var.rancher_secret_key
  }
  type = "Opaque"
  # The release creates the namespace when it is missing.
  depends_on = [helm_release.apono_connector]
}

output "secret_store" {
  value = jsonencode({
    type      = "KUBERNETES"
    namespace = kubernetes_secret.rancher_api_key.metadata[0].namespace
    name      = kubernetes_secret.rancher_api_key.metadata[0].name
  })
}

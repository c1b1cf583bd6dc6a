# A Kubernetes Secret with the Rancher API key, labelled for the agent, and the agent installed
# with Helm, allowed to read that Secret and nothing else.

terraform {
  required_providers {
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
  type    = string
  default = "apono-connector"
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

variable "apono_token" {
  type      = string
  sensitive = true
}

variable "connector_id" {
  type = string
}

variable "apono_url" {
  type    = string
  default = "api.apono.io"
}

variable "image_registry" {
  type    = string
  default = ""
}

provider "kubernetes" {
  config_path = var.kubeconfig
}

provider "helm" {
  kubernetes {
    config_path = var.kubeconfig
  }
}

resource "kubernetes_namespace" "apono" {
  metadata {
    name = var.namespace
  }
}

resource "kubernetes_secret" "rancher_api_key" {
  metadata {
    name      = var.secret_name
    namespace = kubernetes_namespace.apono.metadata[0].name
    labels = {
      # The agent reads only secrets carrying this label.
      "apono-connector-read" = "true"
    }
  }
  data = {
    access_key = var.rancher_access_key
    secret_key = var.rancher_secret_key
  }
  type = "Opaque"
}

resource "helm_release" "apono_connector" {
  name      = "apono-connector"
  chart     = "${path.module}/../../helm/apono-connector"
  namespace = kubernetes_namespace.apono.metadata[0].name

  set_sensitive {
    name  = "apono.token"
    value = var.apono_token
    type  = "string"
  }
  set {
    name  = "apono.connectorId"
    value = var.connector_id
    type  = "string"
  }
  set {
    name  = "apono.url"
    value = var.apono_url
  }
  set {
    name  = "image.registry"
    value = var.image_registry
  }
  set {
    name  = "serviceAccount.manageClusterRoles"
    value = "true"
  }
  # A list of one: the agent may `get` this Secret and no other.
  set {
    name  = "allowedSecretsToRead"
    value = "{${kubernetes_secret.rancher_api_key.metadata[0].name}}"
  }
}

output "secret_store" {
  value = jsonencode({
    type      = "KUBERNETES"
    namespace = kubernetes_secret.rancher_api_key.metadata[0].namespace
    name      = kubernetes_secret.rancher_api_key.metadata[0].name
  })
}

# A GCP Secret Manager secret with the Rancher API key, labelled for the agent and readable by
# the agent's service account (workload identity).

terraform {
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
  }
}

variable "project" {
  type = string
}

variable "secret_id" {
  type    = string
  default = "rancher-api-key"
}

variable "agent_service_account" {
  type        = string
  description = "Email of the Google service account the agent runs as."
}

variable "rancher_access_key" {
  type      = string
  sensitive = true
}

variable "rancher_secret_key" {
  type      = string
  sensitive = true
}

provider "google" {
  project = var.project
}

resource "google_secret_manager_secret" "rancher_api_key" {
  secret_id = var.secret_id
  # The agent reads only secrets carrying this label.
  labels = {
    "apono-connector-read" = "true"
  }
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "rancher_api_key" {
  secret = google_secret_manager_secret.rancher_api_key.id
  secret_data = jsonencode({
    access_key = var.rancher_access_key
    secret_key = var.rancher_secret_key
  })
}

resource "google_secret_manager_secret_iam_member" "agent_reads" {
  secret_id = google_secret_manager_secret.rancher_api_key.id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${var.agent_service_account}"
}

output "secret_store" {
  value = jsonencode({
    type      = "GCP"
    project   = var.project
    secret_id = google_secret_manager_secret.rancher_api_key.secret_id
  })
}

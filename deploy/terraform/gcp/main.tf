# A GCP Secret Manager secret with the Rancher API key, readable by the agent's service account
# (workload identity) and by nothing else this example creates.
#
# The agent needs only `secretmanager.versions.access` on the secret
# (roles/secretmanager.secretAccessor). With require_read_mark = true (set it when the agent runs
# with APONO_REQUIRE_READ_MARK=GCP), the secret is labelled apono-connector-read=true and the
# agent may also read the secret's labels (`secretmanager.secrets.get`, a custom role holding only
# that permission), because the agent then checks the label before reading the value.

terraform {
  required_version = ">= 1.3"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
  }
}

variable "project" {
  type        = string
  description = "Project that holds the secret."
}

variable "secret_id" {
  type    = string
  default = "rancher-api-key"
}

variable "agent_service_account" {
  type        = string
  description = "Email of the Google service account the agent runs as."
}

variable "require_read_mark" {
  type        = bool
  default     = false
  description = "Label the secret and let the agent read the label: for an agent run with APONO_REQUIRE_READ_MARK=GCP."
}

variable "read_mark_role_id" {
  type        = string
  default     = "aponoConnectorReadMark"
  description = "Id of the custom role made when require_read_mark is true. Google keeps a deleted role's id reserved for weeks: choose another id to re-create it sooner."
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
  # The label matters only to an agent that requires it (APONO_REQUIRE_READ_MARK=GCP).
  labels = var.require_read_mark ? { "apono-connector-read" = "true" } : {}
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

# The read itself: secretmanager.versions.access on this secret only.
resource "google_secret_manager_secret_iam_member" "agent_reads" {
  secret_id = google_secret_manager_secret.rancher_api_key.id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${var.agent_service_account}"
}

# The label check (opt-in): secretmanager.secrets.get and nothing more. roles/secretmanager.viewer
# would also do, but it adds listing versions, which the agent never needs.
resource "google_project_iam_custom_role" "read_mark" {
  count       = var.require_read_mark ? 1 : 0
  role_id     = var.read_mark_role_id
  title       = "apono-connector: read a secret's labels"
  permissions = ["secretmanager.secrets.get"]
}

resource "google_secret_manager_secret_iam_member" "agent_reads_mark" {
  count     = var.require_read_mark ? 1 : 0
  secret_id = google_secret_manager_secret.rancher_api_key.id
  role      = google_project_iam_custom_role.read_mark[0].id
  member    = "serviceAccount:${var.agent_service_account}"
}

output "secret_store" {
  value = jsonencode({
    type      = "GCP"
    project   = var.project
    secret_id = google_secret_manager_secret.rancher_api_key.secret_id
  })
}
